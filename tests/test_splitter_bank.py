"""ModuleBank: M modules in one batched forward equal M masked (and calibrated) models."""

from __future__ import annotations

import pytest
import timm
import torch
from splitter_helpers import PlantedNet, random_masks, randomise_model

import md_plugin  # noqa: F401  (registers the CIFAR models)
from md_plugin.splitter import create_masked_model, create_split_graph, extract_module
from md_plugin.splitter.bank import ModuleBank, create_affine_layout, flat_masks
from md_plugin.splitter.calibrate import fold_affine

FAMILIES = {
    "resnet20_cifar": lambda: timm.create_model("resnet20_cifar", num_classes=5),
    "simcnn_cifar": lambda: timm.create_model("simcnn_cifar", num_classes=4, width_mult=1 / 16),
    "planted": PlantedNet,
    # SE gates, hardswish, timm's BatchNormAct2d (the affine goes before its activation)
    "mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
    # grouped convs: a mask entry stands for 8 channels
    "regnety_002": lambda: timm.create_model("regnety_002", num_classes=5),
}


def _setup(name: str):
    torch.manual_seed(0)
    model = randomise_model(FAMILIES[name]())
    size = (3, 8, 8) if name == "planted" else (3, 32, 32)
    sg = create_split_graph(model, size)
    return model, sg, torch.randn(3, *size)


def _affine(bank: ModuleBank, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = 0.5 + torch.rand(m, bank.affine_size, generator=g)
    return s, 0.3 * torch.randn(m, bank.affine_size, generator=g)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bank_rows_equal_the_strong_and_the_masked_models(name):
    model, sg, x = _setup(name)
    bank = ModuleBank(sg)
    with torch.no_grad():
        full = model(x)
        out = bank(x, torch.ones(2, bank.mask_size))
        assert out.shape == (2, *full.shape)
        torch.testing.assert_close(out[0], full, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1], full, rtol=0, atol=1e-5)
        per = [random_masks(sg, s) for s in range(3)]
        out = bank(x, flat_masks(per))
        for i in range(3):
            torch.testing.assert_close(
                out[i], create_masked_model(sg, per[i])(x), rtol=1e-5, atol=1e-5
            )
        # the rows really are different modules
        assert (out[0] - out[1]).abs().max() > 1e-2 * out.abs().max()


def test_bank_with_all_ones_is_bitwise_the_resnet():
    model, sg, x = _setup("resnet20_cifar")
    with torch.no_grad():
        assert torch.equal(ModuleBank(sg)(x, torch.ones(3, sum(sg.num_channels)))[2], model(x))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bank_affine_equals_the_folded_module_masked_and_extracted(name):
    model, sg, x = _setup(name)
    bank = ModuleBank(sg)
    per = [random_masks(sg, s) for s in range(2)]
    scale, shift = _affine(bank, 2, 1)
    with torch.no_grad():
        out = bank(x, flat_masks(per), scale, shift)
        plain = bank(x, flat_masks(per))
        for i in range(2):
            folded = fold_affine(sg, scale[i], shift[i])
            masked = create_masked_model(folded, per[i])(x)
            torch.testing.assert_close(out[i], masked, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                extract_module(folded, per[i])(x), masked, rtol=1e-4, atol=1e-4
            )
        assert (out - plain).abs().max() > 1e-2 * plain.abs().max()  # the affine did something
        torch.testing.assert_close(model(x), bank(x, torch.ones(1, bank.mask_size))[0])  # intact


def test_affine_entries_that_cannot_fold_are_ignored():
    """resnet20's option-A shortcuts are mask sites no parameter follows: identity there."""
    _, sg, x = _setup("resnet20_cifar")
    bank = ModuleBank(sg)
    lay = create_affine_layout(sg)
    kinds = {s.kind for s in lay.sites}
    assert kinds == {"bn", "none"}
    fixed = ~lay.scale_free
    assert fixed.sum() == sum(len(s.affine_index) for s in lay.sites if s.kind == "none") > 0
    masks = torch.ones(1, bank.mask_size)
    scale, shift = torch.ones(1, bank.affine_size), torch.zeros(1, bank.affine_size)
    with torch.no_grad():
        ref = bank(x, masks, scale, shift)
        scale[:, fixed], shift[:, fixed] = 3.0, 5.0
        assert torch.equal(bank(x, masks, scale, shift), ref)
        scale[:, lay.scale_free.nonzero()[0]] = 3.0
        assert not torch.equal(bank(x, masks, scale, shift), ref)


def test_layout_counts_every_site_of_every_group():
    _, sg, _ = _setup("resnet20_cifar")
    lay = create_affine_layout(sg)
    assert lay.size == sum(len(g.sites) * g.width for g in sg.groups)
    assert [e[0] for e in lay.entries] == [g.index for g in sg.groups for _ in g.sites]
    # regnety: masks per unit (conv group of 8), affine per channel
    _, sg, _ = _setup("regnety_002")
    lay = create_affine_layout(sg)
    assert any(g.unit > 1 for g in sg.groups)
    assert len(lay.unit_index) == sum(g.width for g in sg.groups)
    assert lay.size == sum(len(g.sites) * g.width for g in sg.groups)


def test_gradients_reach_masks_scale_and_shift_not_the_weights():
    model, sg, x = _setup("resnet20_cifar")
    bank = ModuleBank(sg)
    masks = torch.full((2, bank.mask_size), 0.7, requires_grad=True)
    scale, shift = (t.requires_grad_(True) for t in bank.layout.identity(2))
    bank.train()
    assert not bank.gm.training  # BN stays in eval mode
    bank(x, masks, scale, shift).square().mean().backward()
    for t in (masks, scale, shift):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert (scale.grad[:, ~bank.layout.scale_free] == 0).all()
    assert all(p.grad is None and not p.requires_grad for p in bank.parameters())


def test_bad_shapes_are_refused():
    _, sg, x = _setup("planted")
    bank = ModuleBank(sg)
    with pytest.raises(ValueError, match="masks must be"):
        bank(x, torch.ones(2, bank.mask_size + 1))
    with pytest.raises(ValueError, match="scale must be"):
        bank(x, torch.ones(2, bank.mask_size), torch.ones(3, bank.affine_size))


def test_a_bn_fused_with_its_activation_carries_the_affine():
    _, sg, _ = _setup("mobilenetv3_small_050")
    lay = create_affine_layout(sg)
    fused = [s for s in lay.sites if s.kind == "bn_act"]
    assert fused and all(lay.scale_free[s.affine_index].all() for s in fused)
    assert all(lay.shift_free[s.affine_index].all() for s in fused)
