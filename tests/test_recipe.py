"""timm's recipe pieces built from train.py flags: mixup/cutmix, timm losses, repeats, erasing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from md_plugin.doctor import dominant_label
from md_plugin.errors import ConfigError
from md_plugin.train.args import parse_args
from md_plugin.train.recipe import (
    create_batch_augment,
    create_mixup,
    create_repeat_sampler,
    create_train_loss,
    set_mixup_epoch,
)

C = 5


def _batch(b: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 8, generator=g), torch.arange(b) % C


def test_no_mixup_by_default():
    assert create_mixup(parse_args([]), C) is None
    assert create_batch_augment(parse_args([]), None, "cpu") is None


def test_mixup_is_a_convex_pair_mix_with_smoothed_targets():
    a = parse_args(["--mixup", "0.8", "--smoothing", "0.1", "-b", "8"])
    mix = create_mixup(a, C)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.mode) == (0.8, 0.0, 1.0, "batch")
    x, y = _batch()
    torch.manual_seed(0)
    xm, t = mix(x.clone(), y)
    # batch mode: one lambda; x_mixed = lam x + (1 - lam) x.flip(0)
    flat, flip = x.reshape(8, -1), x.flip(0).reshape(8, -1)
    lam = float(((xm.reshape(8, -1) - flip) * (flat - flip)).sum() / ((flat - flip) ** 2).sum())
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    off, on = 0.1 / C, 1 - 0.1 + 0.1 / C
    expect = lam * (F.one_hot(y, C) * (on - off) + off) + (1 - lam) * (
        F.one_hot(y.flip(0), C) * (on - off) + off
    )
    assert torch.allclose(t, expect, atol=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(8))
    # Model Doctor's label: the dominant one
    want = y if lam >= 0.5 else y.flip(0)
    assert torch.equal(dominant_label(t), want) or math.isclose(lam, 0.5)
    assert torch.equal(dominant_label(y), y)


def test_cutmix_flags_reach_timm_mixup():
    a = parse_args(["--cutmix", "1.0", "--cutmix-minmax", "0.2", "0.6", "--mixup-prob", "0.5",
                    "--mixup-switch-prob", "0.3", "--mixup-mode", "elem", "-b", "8"])  # fmt: skip
    mix = create_mixup(a, C)
    assert mix.cutmix_minmax == [0.2, 0.6] and mix.mix_prob == 0.5 and mix.switch_prob == 0.3
    assert mix.mode == "elem" and mix.label_smoothing == 0.1


def test_mixup_needs_an_even_batch():
    with pytest.raises(ConfigError, match="--batch-size must be even"):
        create_mixup(parse_args(["--mixup", "0.2", "-b", "7"]), C)


def test_mixup_off_epoch():
    a = parse_args(["--mixup", "1.0", "--smoothing", "0", "--mixup-off-epoch", "3", "-b", "8"])
    mix = create_mixup(a, C)
    x, y = _batch()
    set_mixup_epoch(mix, a, 2)
    assert mix.mixup_enabled
    set_mixup_epoch(mix, a, 3)
    xm, t = mix(x.clone(), y)
    assert torch.equal(xm, x) and torch.equal(t, F.one_hot(y, C).float())


def test_loss_choice_follows_timm():
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    from md_plugin.losses.classification import CrossEntropyLoss

    counts = [10] * C
    assert isinstance(
        create_train_loss(parse_args(["--mixup", "0.2"]), counts), SoftTargetCrossEntropy
    )
    bce_mix = create_train_loss(parse_args(["--mixup", "0.2", "--bce-loss"]), counts)
    assert isinstance(bce_mix, BinaryCrossEntropy) and bce_mix.smoothing == 0.0
    assert isinstance(create_train_loss(parse_args([]), counts), CrossEntropyLoss)


def test_bce_values_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    y = torch.tensor([0, 2])
    s = 0.1
    t = torch.full((2, 3), s / 3) + F.one_hot(y, 3) * (1 - s)
    manual = F.binary_cross_entropy_with_logits(logits, t)
    loss = create_train_loss(parse_args(["--bce-loss", "--smoothing", "0.1"]), [1, 1, 1])
    assert torch.allclose(loss(logits, y), manual)
    summed = create_train_loss(
        parse_args(["--bce-loss", "--smoothing", "0.1", "--bce-sum"]), [1, 1, 1]
    )
    assert torch.allclose(summed(logits, y), manual * 3)  # summed over classes, mean over batch
    thr = create_train_loss(parse_args(["--bce-loss", "--smoothing", "0.1", "--bce-target-thresh", "0.2"]), [1] * 3)  # fmt: skip
    binar = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, 3).float())
    assert torch.allclose(thr(logits, y), binar)  # smoothed targets thresholded back to 0/1
    pw = create_train_loss(parse_args(["--bce-loss", "--smoothing", "0", "--bce-pos-weight", "3"]), [1] * 3)  # fmt: skip
    ref = F.binary_cross_entropy_with_logits(
        logits, F.one_hot(y, 3).float(), pos_weight=torch.tensor(3.0)
    )
    assert torch.allclose(pw(logits, y), ref)


def test_repeat_aug_sampler():
    ds = list(range(10))
    a = parse_args(["--aug-repeats", "3"])
    sampler = create_repeat_sampler(a, ds)
    sampler.set_epoch(1)
    idx = list(sampler)
    assert len(idx) == len(sampler) == 10  # an epoch keeps the dataset's length
    # each image three times in a row
    assert all(idx[i] == idx[i + 1] == idx[i + 2] for i in range(0, 9, 3))
    sampler.set_epoch(2)
    assert list(sampler) != idx
    assert create_repeat_sampler(parse_args([]), ds) is None


def test_resplit_erases_only_the_second_half():
    a = parse_args(["--reprob", "1", "--remode", "const", "--resplit"])
    aug = create_batch_augment(a, None, "cpu")
    x = torch.ones(8, 3, 16, 16)
    out = aug(x.clone(), torch.zeros(8, dtype=torch.long))[0]
    assert torch.equal(out[:4], x[:4])
    assert all((out[i] == 0).any() for i in range(4, 8))


def test_drop_block_and_head_init_reach_the_model():
    from timm.layers import DropBlock2d

    from md_plugin.train.model import create_md_model

    torch.manual_seed(0)
    ref = create_md_model(parse_args(["--model", "resnet18"]), 3)
    torch.manual_seed(0)
    a = parse_args(["--model", "resnet18", "--drop-block", "0.1", "--head-init-scale", "0.001",
                    "--head-init-bias", "0.5"])  # fmt: skip
    m = create_md_model(a, 3)
    blocks = [mod for mod in m.modules() if isinstance(mod, DropBlock2d)]
    assert blocks and all(b.drop_prob == 0.1 for b in blocks)
    assert not any(isinstance(mod, DropBlock2d) for mod in ref.modules())
    assert torch.allclose(m.fc.weight, ref.fc.weight * 0.001)
    assert torch.equal(m.fc.bias, torch.full((3,), 0.5))


def test_device_flag(monkeypatch):
    from md_plugin.train.device import import_device_modules as _import_device_modules
    from md_plugin.train.device import select_device as _select_device

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device cuda:1: this machine has 0 CUDA device"):
            _select_device(parse_args(["--device", "cuda:1"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="accelerate launch --gpu_ids"):
        _select_device(parse_args(["--device", "cuda:0"]))
    _select_device(parse_args(["--device", "cpu"]))  # nothing to do
    _import_device_modules(parse_args(["--device-modules", "json", "csv"]))
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        _import_device_modules(parse_args(["--device-modules", "no_such_module_xyz"]))


def test_transform_kwargs_follow_the_flags():
    from md_plugin.data.transforms import train_transform_kwargs

    kw = train_transform_kwargs(parse_args([]))
    assert kw["interpolation"] == "random" and kw["remode"] == "pixel" and kw["color_jitter"] == 0.4
    kw = train_transform_kwargs(parse_args(["--reprob", "0.5", "--resplit"]))
    assert kw["reprob"] == 0.0  # erasing moves to the batch (BatchAugment)
