"""Report rendering: PNG/HTML validity, Jaccard arithmetic, and exact gradient maps."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from md_plugin.report import jaccard_matrix, render_report, spatial_gradient_maps
from md_plugin.report.plots import _mask_outline, plot_relevance_heatmap, upsample_bilinear
from md_plugin.report.render import safe_file_stem

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = [f"class_{i}" for i in range(10)]


def assert_valid_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:  # verify() leaves the image unusable; reopen for its size
        w, h = im.size
    assert min_side <= w <= 4000 and min_side <= h <= 4000, (path, w, h)


class _ImgSrcParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>, open: {self.stack}"
        self.stack.pop()


def _synthetic_layer(rng: np.random.Generator, n_cls: int = 10, n_ch: int = 16):
    scores = rng.random((n_cls, n_ch))
    masks = rng.random((n_cls, n_ch)) < 0.3
    masks[3] = False  # a class with no relevant channel must not break anything
    return scores, masks


class _InplaceMask(nn.Module):
    """Multiplies its input in place by a fixed spatial mask (tests the hook's clone)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.mask)


def _linear_head_model(weight: torch.Tensor, spatial_mask: torch.Tensor) -> nn.Sequential:
    """conv -> in-place spatial mask -> dropout -> flatten -> linear with a known weight.

    logit_c = sum_{k,h,w} W[c,k,h,w] * M[h,w] * f[k,h,w] + b_c in eval mode, so the gradient
    w.r.t. the conv output f is exactly W[c] * M. Dropout makes a train-mode run visibly wrong.
    """
    n_cls, ch, h, w = weight.shape
    conv = nn.Conv2d(3, ch, 3, padding=1)
    fc = nn.Linear(ch * h * w, n_cls)
    with torch.no_grad():
        fc.weight.copy_(weight.reshape(n_cls, -1))
    return nn.Sequential(conv, _InplaceMask(spatial_mask), nn.Dropout(0.5), nn.Flatten(), fc)


def test_jaccard_matrix_hand_computed():
    masks = np.array(
        [
            [1, 1, 0, 0],  # A = {0, 1}
            [0, 1, 1, 0],  # B = {1, 2}
            [0, 0, 0, 0],  # empty
            [1, 1, 1, 1],  # all
        ],
        dtype=bool,
    )
    expected = np.array(
        [
            [1, 1 / 3, 0, 2 / 4],
            [1 / 3, 1, 0, 2 / 4],
            [0, 0, 1, 0],
            [2 / 4, 2 / 4, 0, 1],
        ]
    )
    np.testing.assert_allclose(jaccard_matrix(masks), expected)
    with pytest.raises(ValueError):
        jaccard_matrix(np.zeros(5, dtype=bool))


def test_upsample_bilinear_matches_torch():
    a = np.random.default_rng(0).random((4, 5))
    ours = upsample_bilinear(a, (16, 13))
    ref = torch.nn.functional.interpolate(
        torch.tensor(a)[None, None], size=(16, 13), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_mask_outline_merges_runs():
    def as_set(segs):
        return {tuple(map(tuple, np.round(s, 2))) for s in segs}

    one = np.zeros((3, 4), dtype=bool)
    one[1, 1:4] = True  # one run of three cells -> one rectangle of four edges
    assert as_set(_mask_outline(one)) == {
        ((0.5, 0.5), (3.5, 0.5)),
        ((0.5, 1.5), (3.5, 1.5)),
        ((0.5, 0.5), (0.5, 1.5)),
        ((3.5, 0.5), (3.5, 1.5)),
    }
    assert _mask_outline(np.zeros((3, 4), dtype=bool)).shape == (0, 2, 2)


def test_safe_file_stem():
    assert safe_file_stem("layer3.*.conv2") == "layer3_conv2"
    assert safe_file_stem("../../etc") == "etc"
    assert safe_file_stem("***") == "layer"


def test_spatial_gradient_maps_known_answer():
    torch.manual_seed(0)
    n_cls, ch, h, w = 3, 4, 6, 6
    weight = torch.randn(n_cls, ch, h, w)
    spatial_mask = torch.ones(h, w)
    spatial_mask[:, :3] = 0.0  # left half masked out downstream of the hooked layer
    model = _linear_head_model(weight, spatial_mask)
    conv = model[0]
    model.train()
    model[2].eval()  # a submodule with its own mode: must be restored exactly

    images = torch.randn(5, 3, h, w)
    targets = [0, 2, 1, 2, 0]
    maps = spatial_gradient_maps(model, conv, images, targets)

    expected = (weight * spatial_mask).clamp(min=0).sum(dim=1)[targets]
    expected = expected / expected.flatten(1).amax(dim=1)[:, None, None]
    assert maps.shape == (5, h, w) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-5)
    assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1)

    assert len(conv._forward_hooks) == 0
    assert model.training and model[0].training and not model[2].training
    raw = spatial_gradient_maps(model, conv, images, targets, normalize="none")
    unscaled = (weight * spatial_mask).clamp(min=0).sum(dim=1)[targets]
    np.testing.assert_allclose(raw, unscaled.numpy(), rtol=1e-5, atol=1e-6)


def test_overlay_maps_are_scale_free_shares_with_robust_limits():
    from md_plugin.report.plots import gradient_shares_map, robust_limit

    m = np.array([[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    s = gradient_shares_map(m)
    np.testing.assert_allclose(s[0], [[0.25, 0.75], [0, 0]])
    assert (s[1] == 0).all()  # an all-zero map stays zero
    np.testing.assert_allclose(gradient_shares_map(m * 1e-4), s)  # shrinking changes nothing
    # one hot cell among 99 ordinary ones does not set the colour limit
    v = np.r_[np.ones(99), 1000.0]
    assert robust_limit(v, 95) == 1.0 and robust_limit(v, 100) == 1000.0
    assert robust_limit(np.zeros(3)) == 1.0


def test_spatial_gradient_maps_rejects_2d_output_and_cleans_up():
    model = _linear_head_model(torch.randn(2, 2, 4, 4), torch.ones(4, 4))
    model.eval()
    fc = model[4]
    with pytest.raises(ValueError, match="4-D"):
        spatial_gradient_maps(model, fc, torch.randn(2, 3, 4, 4), [0, 1])
    assert len(fc._forward_hooks) == 0
    assert not model.training
    with pytest.raises(ValueError, match="submodule"):
        spatial_gradient_maps(model, nn.Conv2d(3, 3, 1), torch.randn(2, 3, 4, 4), [0, 1])


def test_render_report_full(tmp_path):
    rng = np.random.default_rng(0)
    layers = {"layer3.*.conv2": _synthetic_layer(rng), "layer3_conv2": _synthetic_layer(rng)}

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    images = torch.rand(3, 3, 16, 16)
    labels = [1, 4, 7]
    maps_before = spatial_gradient_maps(model, model[3], images, labels)
    assert maps_before.shape == (3, 8, 8)
    overlays = {
        "images": images.permute(0, 2, 3, 1).numpy(),
        "labels": labels,
        "maps_before": maps_before,
        "maps_after": maps_before[:, ::-1],
        "layer": "3",
    }
    cm = rng.integers(0, 20, size=(10, 10))
    cm[5] = 0  # a class with no test samples
    report = render_report(
        tmp_path / "out",
        layers=layers,
        class_names=CLASSES,
        acc_before=rng.random(10),
        acc_after=rng.random(10),
        cm_before=cm,
        cm_after=cm + np.eye(10, dtype=int) * 30,
        overlays=overlays,
        summary_rows=[{"run": "<b>demo</b>", "top1": 0.51234}],
    )

    out = tmp_path / "out"
    assert report == out / "report.html"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        [
            "heatmap_layer3_conv2.png",
            "heatmap_layer3_conv2-2.png",
            "jaccard_layer3_conv2.png",
            "jaccard_layer3_conv2-2.png",
            "accuracy.png",
            "confusion.png",
            "gradient_overlays.png",
        ]
    )
    for name in pngs:
        assert_valid_png(out / name)

    text = report.read_text(encoding="utf-8")
    parser = _ImgSrcParser()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    assert sorted(unquote(s) for s in parser.srcs) == pngs
    for src in parser.srcs:
        assert not Path(unquote(src)).is_absolute()
        assert (out / unquote(src)).is_file()
    assert "&lt;b&gt;demo&lt;/b&gt;" in text and "<b>demo</b>" not in text
    assert "layer3.*.conv2" in text


def test_render_report_diagnosis_only(tmp_path):
    report = render_report(
        tmp_path, layers={"fc": _synthetic_layer(np.random.default_rng(1))}, class_names=CLASSES
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["heatmap_fc.png", "jaccard_fc.png"]
    assert report.is_file()
    with pytest.raises(ValueError, match="before"):
        render_report(tmp_path, layers={}, class_names=CLASSES, acc_after=np.ones(10))


def test_heatmap_large_layer_stays_bounded(tmp_path):
    rng = np.random.default_rng(2)
    names = [f"c{i}" for i in range(100)]
    path = plot_relevance_heatmap(
        tmp_path / "big.png", rng.random((100, 512)), rng.random((100, 512)) < 0.1, names, "x"
    )
    assert_valid_png(path, min_side=1000)
    empty = plot_relevance_heatmap(
        tmp_path / "empty.png", np.zeros((3, 4)), np.zeros((3, 4), bool), names[:3], "x"
    )
    assert_valid_png(empty)
    with pytest.raises(ValueError, match="class names"):
        plot_relevance_heatmap(tmp_path / "bad.png", np.ones((3, 4)), np.ones((3, 4)), names, "x")
