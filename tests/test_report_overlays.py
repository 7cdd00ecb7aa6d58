"""The gradient-overlay figure: what each panel shows, its colour limits, its row labels, and
one clear error per malformed input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from md_plugin.report.plots import (
    _overlay_maps,
    gradient_shares_map,
    overlay_limits,
    plot_gradient_overlays,
    upsample_bilinear,
)

RNG = np.random.default_rng(0)
IMAGES = RNG.random((3, 8, 8, 3))
BEFORE = RNG.random((3, 4, 4)) + 0.1  # every map has mass
AFTER = RNG.random((3, 4, 4)) ** 3


def _shares(maps: np.ndarray) -> np.ndarray:
    return np.stack([upsample_bilinear(s, (8, 8)) for s in gradient_shares_map(maps)])


def test_panels_are_upsampled_shares_with_the_limits_overlay_limits_gives():
    after = AFTER.copy()
    after[1] = 0.5 * BEFORE[1]  # half the mass, same place: no change in share
    ov = _overlay_maps(IMAGES, ["cat", "dog", "eel"], [0, 2, 1], BEFORE, after, 99.0, None)
    assert [t for t, _ in ov.panels] == ["before treatment", "after treatment"]
    np.testing.assert_array_equal(ov.panels[0][1], _shares(BEFORE))
    np.testing.assert_array_equal(ov.panels[1][1], _shares(after))
    np.testing.assert_array_equal(ov.diff, _shares(after) - _shares(BEFORE))
    np.testing.assert_allclose(ov.diff[1], 0, atol=1e-15)
    assert (ov.vmax, ov.dlim) == overlay_limits((8, 8), BEFORE, [after])
    ratio = [after[i].sum() / BEFORE[i].sum() for i in range(3)]
    assert ov.row_labels == [f"cat\ntotal mass x{ratio[0]:.2g}", "eel\ntotal mass x0.5",
                             f"dog\ntotal mass x{ratio[2]:.2g}"]  # fmt: skip
    # given limits replace both; a map without mass before gives no ratio; no after: no diff
    before = BEFORE.copy()
    before[0] = 0
    ov = _overlay_maps(IMAGES, ["cat", "dog", "eel"], [0, 2, 1], before, after, 99.0, (0.3, 0.1))
    assert (ov.vmax, ov.dlim) == (0.3, 0.1) and ov.row_labels[0] == "cat"
    ov = _overlay_maps(IMAGES, ["cat", "dog", "eel"], [0, 2, 1], BEFORE, None, 99.0, None)
    assert [t for t, _ in ov.panels] == ["before treatment"] and ov.diff is None
    assert ov.row_labels == ["cat", "eel", "dog"]


def test_grey_images_and_out_of_range_pixels():
    grey = RNG.random((2, 8, 8)) * 3 - 1
    ov = _overlay_maps(grey, [0, 1], [1, 0], BEFORE[:2], None, 99.0, None)
    assert ov.images.min() >= 0 and ov.images.max() <= 1 and ov.row_labels == ["1", "0"]
    np.testing.assert_array_equal(ov.images, np.clip(grey, 0, 1))


@pytest.mark.parametrize("after", [None, AFTER])
def test_the_figure_has_a_column_per_panel(tmp_path, after):
    """Three rows; image, before (and after, and the difference) as columns: the figure grows
    with them."""
    path = plot_gradient_overlays(tmp_path / "o.png", IMAGES, ["a", "b", "c"], [0, 1, 2], BEFORE,
                                  after)  # fmt: skip
    with Image.open(path) as im:
        w, h = im.size
    cols = 2 if after is None else 4
    assert w == pytest.approx(120 * (2.3 * cols + 0.6), abs=2)
    assert h == pytest.approx(120 * (2.3 * 3 + 1.5), abs=2)


@pytest.mark.parametrize(
    "images, names, labels, before, after, words",
    [
        (np.zeros((2, 8)), ["a"], [0, 0], np.zeros((2, 2, 2)), None, "images must be [N, H, W(, 3)]"),
        (IMAGES, ["a"], [0], BEFORE, None, "with N labels; got (3, 8, 8, 3), n=3"),
        (IMAGES, list("abc"), [0, 1, 2], np.zeros((2, 2, 2)), None,
         "gradient maps before treatment must be [3, h, w]; got (2, 2, 2)"),
        (IMAGES, list("abc"), [0, 1, 2], BEFORE, np.zeros((3, 2)),
         "gradient maps after treatment must be [3, h, w]; got (3, 2)"),
        (IMAGES, ["a", "b"], [0, 1, 2], BEFORE, None, "labels must lie in [0, 2); got 0..2"),
        (IMAGES, ["a", "b"], [-1, 1, 0], BEFORE, None, "labels must lie in [0, 2); got -1..1"),
        (np.zeros((0, 8, 8, 3)), ["a"], [], np.zeros((0, 2, 2)), None, "no samples to plot"),
    ],
)  # fmt: skip
def test_a_malformed_input_is_one_value_error_and_no_file(
    tmp_path, images, names, labels, before, after, words
):
    with pytest.raises(ValueError) as e:
        plot_gradient_overlays(tmp_path / "o.png", images, names, labels, before, after)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o.png").exists()
