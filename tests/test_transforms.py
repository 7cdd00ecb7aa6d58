"""timm's augmentation options through create_train_transform: each one measurably acts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from md_plugin.data.transforms import create_random_erasing, create_train_transform
from md_plugin.errors import ConfigError

# mean 0.5 / std 0.5: a pixel value v in [0, 255] becomes 2 v / 255 - 1
CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
       "interpolation": "bilinear", "crop_pct": 1.0}  # fmt: skip
# no random geometry, no colour change: only the option under test acts
STILL = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=None)


def _image(seed: int = 0, size: int = 32) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


def _flat(value: int = 128) -> Image.Image:
    return Image.new("RGB", (32, 32), (value, value, value))


def test_still_transform_is_exact_normalisation():
    img = _image()
    out = create_train_transform(CFG, **STILL)(img)
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_modes(mode):
    """--remode: const erases to 0 (the mean), rand to one colour per box and channel, pixel to
    per-pixel noise; --reprob 0 never erases."""
    torch.manual_seed(0)
    tf = create_train_transform(CFG, **STILL, reprob=1.0, remode=mode)
    base = 0.6  # every pixel of the flat image after normalisation: 2*204/255 - 1
    out = tf(_flat(204))
    erased = (out - base).abs() > 1e-4
    assert erased.any() and not erased.all()
    vals = out[erased.expand_as(out)]
    if mode == "const":
        assert torch.allclose(vals, torch.zeros_like(vals))
    elif mode == "rand":  # few distinct values: one per channel (and box)
        assert len(torch.unique(out[0][erased[0]])) <= 2 and vals.std() > 0
    else:
        assert len(torch.unique(vals)) > 0.9 * vals.numel()
    untouched = create_train_transform(CFG, **STILL, reprob=0.0, remode=mode)(_flat(204))
    assert torch.allclose(untouched, torch.full_like(untouched, base), atol=1e-6)


def test_recount_allows_several_boxes():
    re1, re3 = create_random_erasing(1.0, "const", 1), create_random_erasing(1.0, "const", 3)
    assert (re1.min_count, re1.max_count, re3.max_count) == (1, 1, 3)
    # with up to 3 boxes some images get 2 or 3 separate erased regions along a row scan
    torch.manual_seed(0)
    import random

    random.seed(0)
    counts = []
    for _ in range(60):
        x = torch.ones(3, 64, 64)
        m = (re3(x)[0] == 0).float()
        cols = (m.sum(0) > 0).int()
        rows = (m.sum(1) > 0).int()
        runs = int((cols[1:] > cols[:-1]).sum() + cols[0]) * int(
            (rows[1:] > rows[:-1]).sum() + rows[0]
        )
        counts.append(runs)
    assert max(counts) >= 2


def test_random_train_interpolation_picks_bilinear_or_bicubic_per_image():
    img = _image(1, size=64)  # 64 -> 32: the interpolation changes the pixels
    outs = {}
    for name in ("bilinear", "bicubic"):
        outs[name] = create_train_transform(CFG, **STILL, interpolation=name)(img)
    assert not torch.allclose(outs["bilinear"], outs["bicubic"])
    torch.manual_seed(0)
    tf = create_train_transform(CFG, **STILL, interpolation="random")
    seen = []
    for _ in range(30):
        y = tf(img)
        match = [n for n, ref in outs.items() if torch.allclose(y, ref, atol=1e-6)]
        assert len(match) == 1
        seen.append(match[0])
    assert 5 <= seen.count("bicubic") <= 25  # both, about half each
    # '' / None: the model's interpolation (data_config)
    assert torch.allclose(
        create_train_transform(CFG, **STILL, interpolation="")(img), outs["bilinear"]
    )


def test_grayscale_and_blur_probabilities():
    img = _image(2)
    g = create_train_transform(CFG, **STILL, grayscale_prob=1.0)(img)
    assert torch.allclose(g[0], g[1]) and torch.allclose(g[1], g[2])
    n = create_train_transform(CFG, **STILL, grayscale_prob=0.0)(img)
    assert not torch.allclose(n[0], n[1])
    blur = create_train_transform(CFG, **STILL, gaussian_blur_prob=1.0)
    torch.manual_seed(0)
    stds = [float(blur(img).std()) for _ in range(20)]  # sigma is drawn from [0.1, 2]
    assert min(stds) < 0.5 * float(n.std())  # noise image: a blur removes most of its variance
    none = create_train_transform(CFG, **STILL, gaussian_blur_prob=0.0)
    assert torch.allclose(none(img), n)


def test_colour_jitter_probability_and_null():
    img = _image(3)
    plain = create_train_transform(CFG, **STILL)(img)
    torch.manual_seed(0)
    never = create_train_transform(CFG, **{**STILL, "color_jitter": 0.4}, color_jitter_prob=0.0)
    assert torch.allclose(never(img), plain)
    always = create_train_transform(CFG, **{**STILL, "color_jitter": 0.4}, color_jitter_prob=1.0)
    assert not torch.allclose(always(img), plain)
    assert create_train_transform(CFG, **STILL).photometric is None  # color_jitter null: none


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original"])
def test_auto_augment_specs_change_the_image(aa):
    img = _image(4)
    plain = create_train_transform(CFG, **STILL)(img)
    torch.manual_seed(0)
    import random

    random.seed(0)
    tf = create_train_transform(CFG, **STILL, auto_augment=aa)
    changed = sum(not torch.allclose(tf(img), plain) for _ in range(10))
    assert changed >= 5
    assert type(tf.photometric.transforms[0]).__module__.startswith("timm.data")


def test_bad_auto_augment_spec_is_one_line():
    with pytest.raises(ConfigError, match="timm rejected --aa 'nonsense-x1'"):
        create_train_transform(CFG, auto_augment="nonsense-x1")


@pytest.mark.parametrize("mode", ["rkrc", "rkrr"])
def test_keep_ratio_crop_modes(mode):
    wide = Image.fromarray(np.random.RandomState(5).randint(0, 256, (40, 80, 3), dtype=np.uint8))
    tf = create_train_transform(CFG, train_crop_mode=mode, color_jitter=None)
    assert tf(wide).shape == (3, 32, 32)
    assert tf.pil_geometric is not None
    with pytest.raises(ConfigError, match="rkrc/rkrr"):
        tf(wide, torch.ones(40, 80, dtype=torch.uint8))


def test_mask_follows_the_image_with_random_interpolation():
    """The image is its own mask: after any crop/flip the mask equals the thresholded image."""
    arr = np.zeros((48, 48, 3), dtype=np.uint8)
    arr[10:30, 5:25] = 255
    mask = torch.from_numpy(arr[..., 0] > 0).to(torch.uint8)
    tf = create_train_transform(CFG, scale=(0.3, 1.0), hflip=0.5, color_jitter=None,
                                interpolation="random")  # fmt: skip
    torch.manual_seed(0)
    for _ in range(10):
        x, m = tf(Image.fromarray(arr), mask)
        img_fg = x[0] > 0
        agree = (img_fg == m.bool()).float().mean()
        assert agree > 0.95


def test_posterize_keeping_zero_bits_is_black():
    """timm's strongest posterize keeps 0 bits; Pillow >= 11 refuses 0, our op returns black."""
    from md_plugin.data.transforms import _posterize_any_bits

    img = _image(6)
    assert np.asarray(_posterize_any_bits(img, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize_any_bits(img, 8)), np.asarray(img))
    kept = np.asarray(_posterize_any_bits(img, 2))
    assert np.array_equal(kept, np.asarray(img) & 0b11000000)
