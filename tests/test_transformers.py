"""Transformers and NHWC layers: the channel axis is the real one (ViT, DeiT, ConvNeXt, Swin).

Ground truth two ways: by construction (a ViT whose class-k logit reads known channels of the
final norm, so the diagnosis must find exactly those channels) and against a reference that
takes one sample at a time and moves the channel axis to the front by hand.
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F

import md_plugin  # noqa: F401
from md_plugin.doctor import Diagnosis, LayerDiagnosis, diagnose, model_fingerprint
from md_plugin.doctor.treatment import ModelDoctor, confusing_class
from md_plugin.errors import ConfigError
from md_plugin.layers import resolve_layers

S32 = (3, 32, 32)
K = 5

VIT = dict(img_size=32, patch_size=8, depth=2, num_classes=K)
SWIN = dict(
    img_size=32, window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16, num_classes=K
)
CONVNEXT = dict(conv_mlp=False, depths=(1, 1, 1, 1), num_classes=K)


def _model(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = {"vit": VIT, "deit": VIT, "swin": SWIN, "convnext": CONVNEXT}[name.split("_")[0]]
    return timm.create_model(name, **{**cfg, **kw}).eval()


def _own_labels(model, x):
    """Label each image with the model's own prediction: every image is 'correctly classified'."""
    with torch.no_grad():
        return model(x).argmax(1)


def _reference_scores(model, module, x, y, channel_dim):
    """Per-sample relu gradient mass per channel, one sample at a time, axis moved by hand."""
    out = []
    for b in range(len(y)):
        box = {}
        h = module.register_forward_hook(lambda m, i, o, box=box: box.setdefault("a", o))
        logits = model(x[b : b + 1])
        h.remove()
        (g,) = torch.autograd.grad(logits[0, y[b]], box["a"])
        g = g[0].movedim(channel_dim - 1, 0)  # [C, *positions]
        out.append(g.clamp_min(0).flatten(1).sum(1))
    return torch.stack(out)


LAYOUTS = [
    # model, layer, layout, channels, grid, prefix tokens
    ("vit_tiny_patch16_224", "blocks.1", "nlc", 192, (4, 4), 1),
    ("vit_tiny_patch16_224", "blocks.0.mlp.fc2", "nlc", 192, (4, 4), 1),
    ("vit_tiny_patch16_224", "norm", "nlc", 192, (4, 4), 1),
    ("deit_tiny_patch16_224", "blocks.1", "nlc", 192, (4, 4), 1),
    ("deit_tiny_distilled_patch16_224", "blocks.1", "nlc", 192, (4, 4), 2),
    ("convnext_atto", "stages.1.blocks.0.mlp.fc2", "nhwc", 80, None, 0),
    ("convnext_atto", "stages.1.blocks.0.norm", "nhwc", 80, None, 0),
    ("convnext_atto", "stages.1.blocks.0", "nchw", 80, None, 0),  # permutes back to NCHW
    ("convnext_atto", "stages.1.blocks.0.conv_dw", "nchw", 80, None, 0),
    ("swin_tiny_patch4_window7_224", "layers.1", "nhwc", 32, None, 0),
    ("swin_tiny_patch4_window7_224", "layers.0.blocks.0", "nhwc", 16, None, 0),
    ("swin_tiny_patch4_window7_224", "norm", "nhwc", 32, None, 0),
    ("swin_tiny_patch4_window7_224", "layers.0.blocks.0.mlp.fc2", "nlc", 16, (8, 8), 0),
]


@pytest.mark.parametrize("name, layer, layout, channels, grid, prefix", LAYOUTS)
def test_channel_axis_layout_grid_and_prefix_tokens(name, layer, layout, channels, grid, prefix):
    (ref,) = resolve_layers(_model(name), layer, S32)
    assert (ref.layout, ref.channels, ref.grid, ref.prefix_tokens) == (
        layout,
        channels,
        grid,
        prefix,
    )
    assert ref.spatial


def test_register_tokens_and_no_class_token():
    m = _model("vit_tiny_patch16_224", reg_tokens=3, class_token=False, global_pool="avg")
    (ref,) = resolve_layers(m, "blocks.1", S32)
    assert (ref.prefix_tokens, ref.grid, ref.channels) == (3, (4, 4), 192)
    m0 = _model("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    assert resolve_layers(m0, "blocks.1", S32)[0].prefix_tokens == 0


@pytest.mark.parametrize(
    "name, block",
    [
        ("vit_tiny_patch16_224", "blocks.1"),
        ("deit_tiny_patch16_224", "blocks.1"),
        ("swin_tiny_patch4_window7_224", "layers.1.blocks.0"),
    ],
)
def test_last_conv_on_a_transformer_is_an_error_that_suggests_a_block(name, block):
    m = _model(name)
    with pytest.raises(ConfigError, match=rf"stem 'patch_embed.proj'.*--md-layers {block}$"):
        resolve_layers(m, "last_conv", S32)
    resolve_layers(m, block, S32)  # the suggestion resolves


def test_last_conv_on_convnext_is_a_real_conv_and_windows_are_refused():
    assert resolve_layers(_model("convnext_atto"), "last_conv", S32)[0].name == (
        "stages.2.blocks.0.conv_dw"
    )
    # swin's attention returns [B * windows, N, C]: its first axis is not the batch
    m = _model("swin_tiny_patch4_window7_224")
    with pytest.raises(ConfigError, match="first axis is not the batch"):
        resolve_layers(m, "layers.0.blocks.0.attn", S32)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_diagnosis_finds_the_channels_the_logits_read(name):
    """Construction: class k's logit reads channel set S_k of the final norm's class token, so
    its score is count_k * relu(W[k]) and the relevant channels are exactly S_k."""
    m = _model(name)
    C = 192
    gen = torch.Generator().manual_seed(1)
    W = torch.zeros(K, C)
    sets = [torch.randperm(C, generator=gen)[:6] for _ in range(K)]
    for k, s in enumerate(sets):
        W[k, s] = 1.0 + torch.rand(6, generator=gen)
    with torch.no_grad():
        m.head.weight.copy_(W + torch.randn(K, C, generator=gen) * 1e-3 * (W == 0))
        m.head.bias.zero_()
    x = torch.randn(40, *S32, generator=gen)
    y = _own_labels(m, x)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    d = diagnose(m, loader, "norm", K, per_class=40, theta=0.5)  # size from the first batch
    ld = d.layers["norm"]
    assert ld.scores.shape == (K, C) and d.options["input_size"] == list(S32)
    expected = d.counts[:, None].float() * m.head.weight.detach().clamp_min(0)
    torch.testing.assert_close(ld.scores, expected, rtol=1e-4, atol=1e-5)
    for k, s in enumerate(sets):
        if d.counts[k] > 0:
            assert set(ld.masks[k].nonzero().flatten().tolist()) == set(s.tolist())


@pytest.mark.parametrize(
    "name, layer, channel_dim",
    [
        ("convnext_atto", "stages.1.blocks.0.mlp.fc2", 3),
        ("convnext_atto", "stages.1.blocks.0.norm", 3),
        ("swin_tiny_patch4_window7_224", "layers.1", 3),
        ("swin_tiny_patch4_window7_224", "norm", 3),
        ("vit_tiny_patch16_224", "blocks.1", 2),
    ],
)
def test_diagnosis_scores_equal_the_permuted_reference(name, layer, channel_dim):
    m = _model(name)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, *S32, generator=gen)
    y = _own_labels(m, x)
    (ref,) = resolve_layers(m, layer, S32)
    d = diagnose(m, [(x[:6], y[:6]), (x[6:], y[6:])], [ref], K, per_class=12)
    per = _reference_scores(m, ref.module, x, y, channel_dim)  # the axis we know it is
    expected = torch.zeros(K, per.shape[1]).index_add_(0, y, per)
    torch.testing.assert_close(d.layers[layer].scores, expected, rtol=1e-4, atol=1e-6)
    assert d.counts.sum() == 12


def _diag_for(model, layer, seed=3):
    (ref,) = resolve_layers(model, layer, S32)
    masks = torch.rand(K, ref.channels, generator=torch.Generator().manual_seed(seed)) > 0.5
    layers = {ref.name: LayerDiagnosis(ref.name, masks.float(), masks)}
    opts = {"input_size": list(S32)}
    return (
        ref,
        masks,
        Diagnosis(layers, torch.ones(K, dtype=torch.long), model_fingerprint(model, [ref]), opts),
    )


@pytest.mark.parametrize(
    "name, layer, channel_dim",
    [
        ("vit_tiny_patch16_224", "blocks.1", 2),
        ("convnext_atto", "stages.1.blocks.0.mlp.fc2", 3),
        ("swin_tiny_patch4_window7_224", "layers.1", 3),
    ],
)
def test_channel_loss_equals_the_permuted_reference(name, layer, channel_dim):
    m = _model(name)
    ref, masks, diag = _diag_for(m, layer)
    md = ModelDoctor(m, diag, alpha=1.0, capture_eval=True)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, *S32, generator=gen)
    y = torch.tensor([0, 1, 2, 3])
    logits = m(x)
    _, parts = md.loss(logits, y)
    md.remove()
    t = confusing_class(logits, y)
    true = _reference_scores(m, ref.module, x, y, channel_dim)
    conf = _reference_scores(m, ref.module, x, t, channel_dim)
    M = masks.float()
    expected = ((true * (1 - M[y])).sum(1) + (conf * M[t]).sum(1)).mean()
    assert parts["md_channel"].item() == pytest.approx(expected.item(), rel=1e-4)


def _true_class_grad(m, ref, x1, label):
    """d logit[label] / d (output of ref's module) for one image, by a plain forward hook."""
    box = {}
    h = ref.module.register_forward_hook(lambda mod, i, o: box.setdefault("a", o))
    out = m(x1)
    h.remove()
    return torch.autograd.grad(out[0, label], box["a"])[0]


def test_spatial_loss_on_tokens_uses_the_patch_grid_not_the_class_token():
    m = _model("vit_tiny_patch16_224")
    ref, _, diag = _diag_for(m, "blocks.0")  # patch tokens feed block 1
    md = ModelDoctor(m, diag, alpha=0.0, beta=1.0, capture_eval=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, *S32, generator=gen)
    y = torch.tensor([1, 3])
    fg = torch.zeros(2, 1, 32, 32)
    fg[:, :, :16, :] = 1.0  # top half is the object: patch rows 0-1 of the 4x4 grid
    has = torch.tensor([True, True])
    _, parts = md.loss(m(x), y, fg, has)
    # reference: per sample, patch tokens 1..16 laid out row-major on the 4x4 grid, by hand
    total = 0.0
    for b in range(2):
        g = _true_class_grad(m, ref, x[b : b + 1], y[b])
        grid = g[0, 1:, :].reshape(4, 4, -1)  # [h, w, C]
        assert g[0, 0].abs().sum() > 0  # the class token has gradient, but no position
        total += grid[2:].abs().sum().item()  # background rows
    assert total > 0
    assert parts["md_spatial"].item() == pytest.approx(total / 2, rel=1e-4)
    fg[:] = 1.0  # all foreground: nothing left to penalise, class token or not
    assert md.loss(m(x), y, fg, has)[1]["md_spatial"].item() == 0.0
    md.remove()


def test_fused_attention_is_switched_off_while_attached_and_restored(caplog):
    m = _model("vit_tiny_patch16_224").train()
    attn = [mod for mod in m.modules() if hasattr(mod, "fused_attn")]
    assert attn and all(a.fused_attn for a in attn)
    _, _, diag = _diag_for(m, "blocks.0")
    with caplog.at_level(logging.INFO, logger="md_plugin.doctor.treatment"):
        md = ModelDoctor(m, diag, alpha=1.0)
    lines = [r.message for r in caplog.records if "fused attention" in r.message]
    assert len(lines) == 1 and "2 module(s)" in lines[0]
    assert not any(a.fused_attn for a in attn)
    x, y = torch.randn(2, *S32), torch.tensor([0, 1])
    logits = m(x)
    loss, _ = md.loss(logits, y)
    (F.cross_entropy(logits, y) + loss).backward()  # double backward through attention works
    assert m.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    # ...and is needed: the fused kernel has no double backward on CPU
    for a in attn:
        a.fused_attn = True
    m.zero_grad()
    logits = m(x)
    loss, _ = md.loss(logits, y)
    with pytest.raises(RuntimeError, match="not implemented"):
        loss.backward()
    md.remove()
    assert all(a.fused_attn for a in attn)


def test_alpha_zero_leaves_fused_attention_alone():
    m = _model("vit_tiny_patch16_224")
    _, _, diag = _diag_for(m, "blocks.0")
    md = ModelDoctor(m, diag, alpha=0.0)
    assert all(a.fused_attn for a in m.modules() if hasattr(a, "fused_attn"))
    md.remove()


@pytest.mark.parametrize(
    "name, layer",
    [("convnext_atto", "stages.1.blocks.0.mlp.fc2"), ("vit_tiny_patch16_224", "blocks.0")],
)
def test_report_gradient_maps_sum_over_the_real_channels(name, layer):
    from md_plugin import spatial_gradient_maps

    m = _model(name)
    (ref,) = resolve_layers(m, layer, S32)
    x = torch.randn(2, *S32, generator=torch.Generator().manual_seed(6))
    y = [1, 2]
    maps = spatial_gradient_maps(m, ref.module, x, y, to_map=ref.spatial_map)
    for b in range(2):
        g = _true_class_grad(m, ref, x[b : b + 1], y[b])
        g = g[0, 1:].reshape(4, 4, -1) if ref.layout == "nlc" else g[0]  # [h, w, C] by hand
        expected = g.clamp_min(0).sum(-1)
        expected = expected / expected.max()
        assert maps[b].shape == tuple(expected.shape)
        torch.testing.assert_close(torch.from_numpy(maps[b]), expected, rtol=1e-4, atol=1e-6)


def test_trainer_runs_model_doctor_on_a_vit(cifar10_root, tmp_path):
    """End to end: train_md.py --md on a ViT (fused attention switched off, one log line)."""
    import contextlib
    import csv
    import io

    from md_plugin.train.main import cli

    args = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8",
            "depth=1", "--dataset", "torch/cifar10", "--data-dir", str(cifar10_root),
            "--input-size", "3", "32", "32", "-b", "25", "--lr", "0.01", "--sched", "cosine",
            "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0", "--no-progress",
            "--log-interval", "0", "--seed", "0", "--color-jitter", "0", "--epochs", "1",
            "--md", "--md-baseline-epochs", "1", "--md-layers", "blocks.0", "--md-alpha", "0.5",
            "--md-per-class", "5", "--no-md-report", "--output", str(tmp_path),
            "--experiment", "vit"]  # fmt: skip
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the trainer logs to sys.stdout
        assert cli(args) == 0
    with open(tmp_path / "vit" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_md_channel"]) > 0
    d = Diagnosis.load(tmp_path / "vit" / "diagnosis.safetensors")
    assert d.layers["blocks.0"].scores.shape == (10, 192)  # channels, not the 17 tokens
    assert log.getvalue().count("fused attention off") == 1
