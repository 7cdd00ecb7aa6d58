"""Module calibration: BN re-estimation is an affine, calibrated masked == extracted, storage."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from splitter_helpers import random_masks, randomise_model

import md_plugin  # noqa: F401
from md_plugin.artifacts import save_artifact
from md_plugin.errors import ConfigError
from md_plugin.splitter import (
    PatchedModel,
    SplitModules,
    create_masked_model,
    create_split_graph,
    create_split_modules,
)
from md_plugin.splitter.bank import ModuleBank, bn_reestimation_affine, flat_masks
from md_plugin.splitter.calibrate import (
    CalibrationConfig,
    calibrate_modules,
    estimate_bn_affine,
)


def test_bn_with_new_statistics_is_an_affine_of_the_old_bn():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6, eps=1e-3).eval()
    bn.running_mean.copy_(torch.randn(6, generator=g))
    bn.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    bn.weight.data.copy_(torch.randn(6, generator=g))
    bn.weight.data[2] = 0.0  # gamma = 0 is fine: no division by gamma
    bn.bias.data.copy_(torch.randn(6, generator=g))
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.05
    new = nn.BatchNorm2d(6, eps=1e-3).eval()
    new.load_state_dict(bn.state_dict())
    new.running_mean.copy_(mean)
    new.running_var.copy_(var)
    x = torch.randn(4, 6, 5, 5, generator=g)
    a, b = bn_reestimation_affine(bn, mean, var)
    with torch.no_grad():
        got = bn(x).double() * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        torch.testing.assert_close(got.float(), new(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20_cifar", "mobilenetv3_small_050"])
def test_bn_calibration_on_one_batch_equals_training_mode_bn(name):
    """Each module's BNs normalised with its own batch statistics under its mask (also timm's
    BatchNormAct2d, whose affine goes between the BN and its activation)."""
    torch.manual_seed(0)
    model = randomise_model(timm.create_model(name, num_classes=5))
    sg = create_split_graph(model, (3, 32, 32))
    bank = ModuleBank(sg)
    per = [random_masks(sg, s) for s in range(2)]
    x = torch.randn(16, 3, 32, 32)
    scale, shift = estimate_bn_affine(bank, flat_masks(per), x, batch_size=16)
    with torch.no_grad():
        out = bank(x, flat_masks(per), scale, shift)
        for i in range(2):
            ref = create_masked_model(sg, per[i]).train()(x)  # BN with batch statistics
            torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-4)
    # sites with nothing to fold into (resnet20's shortcuts) stay the identity
    assert (scale[:, ~bank.layout.scale_free] == 1).all()
    assert (scale[:, bank.layout.scale_free] != 1).any()


def _split(name: str, width: float | None = None):
    torch.manual_seed(0)
    kw = {"width_mult": width} if width else {}
    model = randomise_model(timm.create_model(name, num_classes=3, **kw))
    sg = create_split_graph(model, (3, 32, 32))
    per = [random_masks(sg, s) for s in range(3)]
    return model, create_split_modules(model, sg, [0, 1, 2], per)


@pytest.mark.parametrize("name, width", [("resnet20_cifar", None), ("simcnn_cifar", 1 / 16)])
def test_calibrated_masked_equals_calibrated_extracted(name, width, tmp_path):
    model, mods = _split(name, width)
    x = torch.randn(24, 3, 32, 32)
    y = torch.arange(3).repeat(8)
    with torch.no_grad():
        before = [mods.module(c)(x) for c in range(3)]
    cfg = CalibrationConfig(mode="affine", images=24, steps=12, lr=0.02, batch_size=8)
    info = calibrate_modules(mods, x, cfg, log=lambda s: None)
    assert mods.calibrated and info["loss"][-1]["loss"] < info["loss"][0]["loss"]
    with torch.no_grad():
        for c in range(3):
            masked, ext = mods.module(c)(x), mods.module(c, extract=True)(x)
            torch.testing.assert_close(masked, ext, rtol=1e-4, atol=1e-4)
            assert (masked - before[c]).abs().max() > 1e-3  # calibration changed the module
        torch.testing.assert_close(model(x), mods._model(x))  # the strong model is intact
    # measure, the file and the patched model all use the calibrated module
    mods.measure([(x, y)])
    path = mods.save(tmp_path / "m.safetensors")
    back = SplitModules.load(path, model)
    assert back.calibrated and torch.equal(back.calib_scale, mods.calib_scale)
    assert back.options["calibration"]["mode"] == "affine"
    weak = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    patched = PatchedModel(weak, back.module(1), -1, 1, back.range(1))
    with torch.no_grad():
        own = mods.module(1, extract=True)(x)[:, 1]
        lo, hi = mods.range(1)
        torch.testing.assert_close(
            patched.module_score(x), (own - lo) / (hi - lo), rtol=1e-3, atol=1e-3
        )
        assert float(own[y == 1].min()) == pytest.approx(lo, abs=1e-5)


def test_bn_mode_without_batchnorm_is_a_no_op_with_one_line():
    _, mods = _split("simcnn_cifar", 1 / 16)
    lines = []
    calibrate_modules(mods, torch.randn(6, 3, 32, 32), CalibrationConfig(mode="bn"), lines.append)
    assert lines == [
        "calibrate bn: the model has no BatchNorm at a mask site; nothing to re-estimate"
    ]
    assert (mods.calib_scale == 1).all() and (mods.calib_shift == 0).all()


def test_version_1_files_still_load_and_other_sites_are_refused(tmp_path):
    model, mods = _split("resnet20_cifar")
    art = {
        "masks": mods.masks.to(torch.uint8),
        "ranges": mods.ranges,
        "classes": torch.tensor(mods.classes),
    }
    meta = {
        "groups": [list(g) for g in zip(mods.group_names, mods.group_channels)],
        "fingerprint": mods.fingerprint,
        "stats": {},
        "options": {},
    }
    old = SplitModules.load(save_artifact(tmp_path / "v1.safetensors", "md_plugin.splitter.modules", 1, art, meta), model)  # fmt: skip
    assert not old.calibrated and torch.equal(old.masks, mods.masks)
    scale, shift = ModuleBank(mods.split_graph).layout.identity(3)
    mods.set_calibration(scale * 1.1, shift)
    mods.calib_layout = mods.calib_layout[:-1]  # as if the splitter found other sites
    path = mods.save(tmp_path / "v2.safetensors")
    with pytest.raises(Exception, match="other mask sites|calibration shape") as e:
        SplitModules.load(path, model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(mode="fancy"), "none|bn|affine"),
        (dict(mode="affine", images=0), "--calibrate-images"),
        (dict(mode="affine", steps=0), "--calibrate-steps"),
        (dict(lr=0.0), "--calibrate-lr"),
    ],
)
def test_bad_calibration_settings_are_one_line(kw, words):
    with pytest.raises(ConfigError, match=words) as e:
        CalibrationConfig(**kw).validate()
    assert "\n" not in str(e.value)
