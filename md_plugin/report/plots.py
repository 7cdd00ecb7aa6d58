"""One-figure-per-file plots of a Model Doctor diagnosis and of what treatment changed.

Every function takes plain numpy arrays and labels (no torch, no diagnosis objects), so the
plots can be drawn from a saved diagnosis on any machine. Figures are built with the
object-oriented ``matplotlib.figure.Figure`` API, which renders through Agg without selecting a
global backend: safe on headless machines and inside training processes that may already use
pyplot with another backend.

Figure sizes grow with the number of classes and channels (within caps), and tick labels are
thinned so that they never overlap, so the same code serves CIFAR-10 with 64 channels and
CIFAR-100 with 512.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: this module never needs a display

import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import Normalize, PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = [
    "as_percent",
    "jaccard_matrix",
    "plot_accuracy_bars",
    "plot_confusion_pair",
    "gradient_shares_map",
    "plot_gradient_overlays",
    "plot_jaccard",
    "plot_relevance_heatmap",
    "robust_limit",
    "upsample_bilinear",
]

_DPI = 120
_OUTLINE = "#d62728"  # red: contrasts with both ends of the "Blues" colour map
_BEFORE, _AFTER = "#9e9e9e", "#1f77b4"


# ----------------------------------------------------------------------------- helpers


def _check_names(class_names: Sequence[str], n: int, what: str) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ValueError(f"{what} has {n} classes but {len(names)} class names were given")
    return names


def _label_step(n: int, axis_in: float, fontsize: float) -> int:
    """Show every k-th label so neighbouring labels sit at least 1.3 font heights apart."""
    max_labels = max(1, int(axis_in * 72 / (1.3 * fontsize)))
    return max(1, math.ceil(n / max_labels))


def _class_ticks(ax, axis: str, names: list[str], axis_in: float, fontsize: float) -> None:
    """Label class rows/columns by name, thinned to every k-th class when they would collide."""
    step = _label_step(len(names), axis_in, fontsize)
    idx = np.arange(0, len(names), step)
    labels = [names[i] for i in idx]
    if axis == "y":
        ax.set_yticks(idx, labels, fontsize=fontsize)
    else:
        rot = 90 if len(names) > 10 else 45
        ax.set_xticks(
            idx, labels, fontsize=fontsize, rotation=rot, ha="right" if rot == 45 else "center"
        )


def _annotate_cells(ax, im: AxesImage, values: np.ndarray, fmt: str, fontsize: float) -> None:
    """Write each cell's value in it, black on light cells and white on dark ones."""
    rgba = im.cmap(im.norm(values))
    luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    for (i, j), v in np.ndenumerate(values):
        colour = "black" if luminance[i, j] > 0.5 else "white"
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=fontsize, color=colour)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _runs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, stop) of every run of True along axis 1 of a 2-D boolean array."""
    padded = np.pad(b.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(d == 1)
    _, stops = np.nonzero(d == -1)  # same row order as starts: nonzero scans row-major
    return rows_s, starts, stops


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    """Line segments [S, 2, 2] tracing the boundary of the True regions of a cell grid.

    Boundaries are merged into maximal straight runs, so a row of 200 consecutive relevant
    channels is one rectangle, not 200: this keeps 100 x 512 heatmaps fast and uncluttered.
    """
    m = mask.astype(bool)
    # horizontal edges: between row r-1 and r (r = 0..C) where membership changes
    horiz = np.pad(m, ((1, 1), (0, 0)))
    h_rows, h_start, h_stop = _runs(horiz[1:] != horiz[:-1])
    # vertical edges: between column k-1 and k (k = 0..K), found as runs down each column
    vert = np.pad(m, ((0, 0), (1, 1)))
    v_cols, v_start, v_stop = _runs((vert[:, 1:] != vert[:, :-1]).T)
    segs_h = np.stack(
        [np.stack([h_start - 0.5, h_rows - 0.5], 1), np.stack([h_stop - 0.5, h_rows - 0.5], 1)], 1
    )
    segs_v = np.stack(
        [np.stack([v_cols - 0.5, v_start - 0.5], 1), np.stack([v_cols - 0.5, v_stop - 0.5], 1)], 1
    )
    return np.concatenate([segs_h, segs_v]).astype(float)


def _row_minmax(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise each row; constant rows become 0 (no channel stands out)."""
    lo = scores.min(axis=1, keepdims=True)
    span = scores.max(axis=1, keepdims=True) - lo
    return np.divide(scores - lo, span, out=np.zeros_like(scores), where=span > 0)


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    """Turn counts into per-true-class rates; classes with no samples stay all-zero."""
    cm = np.asarray(cm, dtype=float)
    total = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, total, out=np.zeros_like(cm), where=total > 0)


def upsample_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to (H, W), half-pixel centres (torch align_corners=False).

    Pure numpy so overlays need no torch; gradient maps are coarse (e.g. 8x8 for 32x32 input).
    """
    a = np.asarray(a, dtype=float)
    out_h, out_w = size

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        x0 = np.floor(x).astype(int)
        return x0, np.minimum(x0 + 1, n_in - 1), x - x0

    y0, y1, fy = coords(out_h, a.shape[0])
    x0, x1, fx = coords(out_w, a.shape[1])
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


# ----------------------------------------------------------------------------- diagnosis


def plot_relevance_heatmap(
    path: str | Path,
    scores: np.ndarray,
    masks: np.ndarray,
    class_names: Sequence[str],
    layer_name: str,
) -> Path:
    """Class x channel heatmap of diagnosis scores, relevant (mask=True) cells outlined.

    Scores are min-max normalised per class because raw gradient magnitudes differ a lot
    between classes; what matters for the mask is which channels stand out *within* a class.
    Channels keep their original order so the picture can be matched to channel indices.
    """
    scores = np.asarray(scores, dtype=float)
    masks = np.asarray(masks, dtype=bool)
    if scores.ndim != 2 or scores.shape != masks.shape:
        raise ValueError(
            f"scores and masks must both be [classes, channels]; got {scores.shape} and {masks.shape}"
        )
    n_cls, n_ch = scores.shape
    names = _check_names(class_names, n_cls, "scores")

    width = float(np.clip(3.5 + 0.18 * n_ch, 7, 22))
    height = float(np.clip(2.0 + 0.28 * n_cls, 3.5, 24))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(
        _row_minmax(scores), cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
    )
    # outline width follows the cell size: visible on 16 channels, not smothering on 512
    cell_pt = min((width - 3) / n_ch, (height - 1.5) / n_cls) * 72
    lw = float(np.clip(0.25 * cell_pt, 0.6, 1.5))
    ax.add_collection(LineCollection(_mask_outline(masks), colors=_OUTLINE, linewidths=lw))
    ax.set_xlim(-0.5, n_ch - 0.5)
    ax.set_ylim(n_cls - 0.5, -0.5)

    ax.xaxis.set_major_locator(MaxNLocator(nbins=max(4, int(width * 1.5)), integer=True))
    ax.tick_params(axis="x", labelsize=8)
    _class_ticks(ax, "y", names, height - 1.5, 8)
    ax.set_xlabel(f"channel index ({n_ch} channels)")
    ax.set_ylabel("class")
    per_class = masks.sum(axis=1)
    ax.set_title(
        f"Channel relevance per class: {layer_name}\n"
        f"colour = score min-max normalised within each class; red outline = relevant channel "
        f"({per_class.mean():.1f} of {n_ch} per class on average)",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01, label="normalised score")
    return _save(fig, path)


def jaccard_matrix(masks: np.ndarray) -> np.ndarray:
    """Pairwise Jaccard overlap |A & B| / |A | B| of the classes' relevant-channel sets.

    ``masks`` is [classes, channels] boolean; the result is [classes, classes] in [0, 1].
    A class with no relevant channel has an empty set and 0/0 is undefined; we define it as 1
    on the diagonal (a set is identical to itself) and 0 off it (two classes that use no
    channel share nothing), so an empty mask never looks like overlap with other classes.
    """
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"masks must be [classes, channels]; got shape {m.shape}")
    mi = m.astype(np.int64)
    inter = mi @ mi.T
    size = mi.sum(axis=1)
    union = size[:, None] + size[None, :] - inter
    jac = np.divide(inter, union, out=np.zeros(inter.shape, dtype=float), where=union > 0)
    np.fill_diagonal(jac, 1.0)  # |A & A| / |A | A| = 1, and our convention for empty A
    return jac


def plot_jaccard(
    path: str | Path, masks: np.ndarray, class_names: Sequence[str], layer_name: str
) -> Path:
    """Class-to-class Jaccard overlap of relevant channels: bright off-diagonal = shared channels.

    High overlap between two classes means the layer routes them through the same channels,
    a usual suspect when those classes are confused with each other.
    """
    jac = jaccard_matrix(masks)
    n = jac.shape[0]
    names = _check_names(class_names, n, "masks")
    side = float(np.clip(2.5 + 0.22 * n, 5, 22))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(jac, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if n <= 20:
        _annotate_cells(ax, im, jac, ".2f", fontsize=max(5.0, 9 - 0.2 * n))
    _class_ticks(ax, "x", names, side - 1.5, 8)
    _class_ticks(ax, "y", names, side - 1.5, 8)
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    off = jac[~np.eye(n, dtype=bool)]
    mean_off = off.mean() if off.size else float("nan")
    ax.set_title(
        f"Relevant-channel overlap (Jaccard): {layer_name}\n"
        f"1 = same channels, 0 = disjoint; mean between classes {mean_off:.2f}",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01, label="Jaccard index")
    return _save(fig, path)


# ----------------------------------------------------------------------------- treatment


def as_percent(acc: np.ndarray) -> np.ndarray:
    """Accuracies may come as fractions or percentages; anything all <= 1 is a fraction."""
    acc = np.asarray(acc, dtype=float)
    return acc * 100 if np.nanmax(acc, initial=0.0) <= 1.0 else acc


def plot_accuracy_bars(
    path: str | Path,
    acc_before: np.ndarray,
    acc_after: np.ndarray | None,
    class_names: Sequence[str],
) -> Path:
    """Per-class accuracy before vs after treatment as grouped bars, class-mean in the legend.

    Accuracies are fractions in [0, 1] or percentages (values all <= 1 are read as fractions).
    The legend mean is the unweighted class mean (balanced accuracy), the figure of merit on
    long-tailed data. ``acc_after=None`` draws the "before" bars alone.
    """
    before = as_percent(acc_before)
    after = None if acc_after is None else as_percent(acc_after)
    n = before.shape[0]
    if after is not None and after.shape != before.shape:
        raise ValueError(f"acc_before has shape {before.shape} but acc_after {after.shape}")
    names = _check_names(class_names, n, "acc_before")

    width = float(np.clip(4.0 + 0.28 * n, 8, 26))
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    bar_w = 0.4 if after is not None else 0.7
    off = bar_w / 2 if after is not None else 0.0
    ax.bar(x - off, before, bar_w, color=_BEFORE, label=f"before (mean {before.mean():.1f}%)")
    ax.axhline(before.mean(), color=_BEFORE, ls="--", lw=1)
    if after is not None:
        ax.bar(x + off, after, bar_w, color=_AFTER, label=f"after (mean {after.mean():.1f}%)")
        ax.axhline(after.mean(), color=_AFTER, ls="--", lw=1)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, max(100.0, float(np.nanmax(before)) * 1.05))
    _class_ticks(ax, "x", names, width - 1.5, 8)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    title = (
        "Per-class accuracy before and after treatment"
        if after is not None
        else "Per-class accuracy"
    )
    ax.set_title(title + " (dashed = class mean)", fontsize=10)
    # outside the axes, where it can hide no bar
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    return _save(fig, path)


def plot_confusion_pair(
    path: str | Path,
    cm_before: np.ndarray,
    cm_after: np.ndarray | None,
    class_names: Sequence[str],
) -> Path:
    """Row-normalised confusion matrices before and after treatment, side by side.

    Rows are true classes and sum to 1, so each row reads as "where did this class's samples
    go", independent of how many samples the class has (important on long-tailed test sets).
    """
    mats = [("before treatment", cm_before)]
    if cm_after is not None:
        mats.append(("after treatment", cm_after))
    normed = [(t, _row_normalise(cm)) for t, cm in mats]
    n = normed[0][1].shape[0]
    for t, cm in normed:
        if cm.shape != (n, n):
            raise ValueError(f"confusion matrix {t} has shape {cm.shape}; expected ({n}, {n})")
    names = _check_names(class_names, n, "cm_before")

    side = float(np.clip(2.5 + 0.2 * n, 4.5, 12))
    fig = Figure(figsize=(side * len(normed) + 1.2, side + 0.6), layout="constrained")
    axes = fig.subplots(1, len(normed), squeeze=False)[0]
    im = None
    for ax, (t, cm) in zip(axes, normed):
        # square-root colour scale: the few-percent confusions that matter stay visible
        im = ax.imshow(cm, cmap="Blues", norm=PowerNorm(0.5, 0, 1), interpolation="nearest")
        if n <= 15:
            _annotate_cells(ax, im, cm, ".2f", fontsize=max(5.0, 8 - 0.2 * n))
        _class_ticks(ax, "x", names, side - 1.5, 8)
        _class_ticks(ax, "y", names, side - 1.5, 8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(
            f"{t}\nmean per-class accuracy (diagonal) {np.diag(cm).mean():.1%}", fontsize=10
        )
    fig.colorbar(im, ax=list(axes), shrink=0.8, pad=0.01, label="fraction of the true class")
    return _save(fig, path)


def gradient_shares_map(maps: np.ndarray) -> np.ndarray:
    """[N, h, w] non-negative maps -> each map's share of its own total (sums to 1; 0 stays 0).

    Where the gradient sits, independent of its overall size: a treatment that shrinks every
    gradient leaves these maps unchanged, one that moves gradient changes them.
    """
    m = np.clip(np.asarray(maps, dtype=float), 0, None)
    tot = m.reshape(m.shape[0], -1).sum(1)[:, None, None]
    return np.divide(m, tot, out=np.zeros_like(m), where=tot > 0)


def robust_limit(values: np.ndarray, q: float = 99.0) -> float:
    """The ``q``-th percentile of ``values`` (ignoring zeros and NaN), > 0: a colour limit that a
    few hot cells cannot stretch, so most of the map keeps its contrast."""
    v = np.abs(np.asarray(values, dtype=float)).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.percentile(v, q)) if v.size else 1.0


def overlay_limits(
    size: tuple[int, int], maps_before: np.ndarray, maps_after: Sequence[np.ndarray],
    percentile: float = 99.0,
) -> tuple[float, float]:  # fmt: skip
    """The colour limits :func:`plot_gradient_overlays` would choose for one figure with all of
    ``maps_after`` at once (each against ``maps_before``): one scale for several figures."""

    def up(m: np.ndarray) -> np.ndarray:
        return np.stack([upsample_bilinear(s, size) for s in gradient_shares_map(m)])

    before = up(np.asarray(maps_before, dtype=float))
    after = [up(np.asarray(m, dtype=float)) for m in maps_after]
    vmax = robust_limit(np.concatenate([before, *after]), percentile)
    return vmax, robust_limit(np.concatenate([a - before for a in after]), percentile)


@dataclass
class _Overlays:
    """What :func:`plot_gradient_overlays` draws: the images and their row labels, each map
    panel as shares upsampled to the image size, the difference (after - before, or None), and
    the colour limits."""

    images: np.ndarray  # [N, H, W(, 3)] in [0, 1]
    row_labels: list[str]  # true class, and the change in total gradient mass when known
    panels: list[tuple[str, np.ndarray]]  # ("before treatment", [N, H, W]), (after, ...)
    diff: np.ndarray | None
    vmax: float
    dlim: float


def _overlay_maps(
    images: np.ndarray,
    class_names: Sequence[str],
    labels: Sequence[int],
    maps_before: np.ndarray,
    maps_after: np.ndarray | None,
    percentile: float,
    limits: tuple[float, float] | None,
) -> _Overlays:
    """Check the inputs and compute every panel and limit (see :func:`plot_gradient_overlays`)."""
    images = np.clip(np.asarray(images, dtype=float), 0, 1)
    labels = np.asarray(labels, dtype=int).reshape(-1)
    raw = [("before treatment", np.asarray(maps_before, dtype=float))]
    if maps_after is not None:
        raw.append(("after treatment", np.asarray(maps_after, dtype=float)))
    n = images.shape[0]
    if images.ndim not in (3, 4) or labels.shape[0] != n:
        raise ValueError(f"images must be [N, H, W(, 3)] with N labels; got {images.shape}, {n=}")
    for t, m in raw:
        if m.ndim != 3 or m.shape[0] != n:
            raise ValueError(f"gradient maps {t} must be [{n}, h, w]; got {m.shape}")
    if n == 0:
        raise ValueError("no samples to plot: give at least one image and its maps")
    names = [str(c) for c in class_names]
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(
            f"labels must lie in [0, {len(names)}); got {labels.min()}..{labels.max()}"
        )
    h, w = images.shape[1:3]
    up = [
        (t, np.stack([upsample_bilinear(s, (h, w)) for s in gradient_shares_map(m)]))
        for t, m in raw
    ]
    vmax = robust_limit(np.concatenate([u for _, u in up]), percentile) if n else 1.0
    diff = up[1][1] - up[0][1] if len(up) == 2 else None
    dlim = robust_limit(diff, percentile) if diff is not None and n else 1.0
    if limits is not None:
        vmax, dlim = limits
    mass = [m.reshape(n, -1).sum(1) for _, m in raw]
    row_labels = []
    for i in range(n):
        label = names[labels[i]]
        if len(mass) == 2 and mass[0][i] > 0:
            label += f"\ntotal mass x{mass[1][i] / mass[0][i]:.2g}"
        row_labels.append(label)
    return _Overlays(images, row_labels, up, diff, vmax, dlim)


def _draw_overlay_rows(axes: np.ndarray, ov: _Overlays) -> AxesImage | None:
    """One row per sample: the image, each map over a faint grey copy, the difference."""
    im_map = None
    for i, img in enumerate(ov.images):
        axes[i, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[i, 0].set_ylabel(ov.row_labels[i], fontsize=9)
        # a faint grey copy under the map keeps the object recognisable
        grey = img if img.ndim == 2 else img @ np.array([0.299, 0.587, 0.114])
        for j, (_, u) in enumerate(ov.panels, start=1):
            axes[i, j].imshow(grey, cmap="gray", vmin=0, vmax=1)
            im_map = axes[i, j].imshow(u[i], cmap="magma", alpha=0.8, vmin=0, vmax=ov.vmax)
        if ov.diff is not None:
            axes[i, -1].imshow(grey, cmap="gray", vmin=0, vmax=1)
            axes[i, -1].imshow(ov.diff[i], cmap="RdBu_r", alpha=0.85, vmin=-ov.dlim, vmax=ov.dlim)
    return im_map


def _overlay_titles_and_bars(
    fig: Figure, axes: np.ndarray, ov: _Overlays, im_map: AxesImage | None, percentile: float
) -> None:
    """Column titles, no ticks, and opaque colour bars (the overlays' transparency would wash
    them out)."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("image (row label = true class)", fontsize=9)
    for j, (t, _) in enumerate(ov.panels, start=1):
        axes[0, j].set_title(f"true-class gradient,\n{t}", fontsize=9)
    if ov.diff is not None:
        axes[0, -1].set_title("after - before\n(red: gained, blue: lost)", fontsize=9)
    if not len(ov.images):
        return
    fig.colorbar(
        ScalarMappable(Normalize(0, ov.vmax), cmap=im_map.cmap if im_map else "magma"),
        ax=axes[:, 1 : 1 + len(ov.panels)].ravel().tolist(),
        location="bottom",
        shrink=0.8,
        aspect=30,
        label=f"share of the map's gradient per cell (clipped at the {percentile:g}th pct)",
    )
    if ov.diff is not None:
        fig.colorbar(
            ScalarMappable(Normalize(-ov.dlim, ov.dlim), cmap="RdBu_r"),
            ax=axes[:, -1].tolist(),
            location="bottom",
            shrink=0.9,
            aspect=15,
            label="change in share",
        )


def plot_gradient_overlays(
    path: str | Path,
    images: np.ndarray,
    class_names: Sequence[str],
    labels: Sequence[int],
    maps_before: np.ndarray,
    maps_after: np.ndarray | None = None,
    *,
    percentile: float = 99.0,
    limits: tuple[float, float] | None = None,
) -> Path:
    """One row per sample: the image, its true-class gradient map before (and after) treatment,
    and with both a difference panel (after - before).

    ``images`` are [N, H, W, 3] (or [N, H, W] grey) floats in [0, 1]; maps are [N, h, w],
    non-negative, at any scale (raw gradients are best: the row label then gives the change in
    total gradient mass). Each map is shown as its share of its own total (where the gradient
    sits, not how large it is), upsampled bilinearly to H x W, in a perceptually uniform colormap
    (magma) whose limit is the ``percentile``-th percentile of all shown map values, shared by
    before and after so they compare directly. The difference panel uses a diverging colormap
    (red = gained share, blue = lost), symmetric at the ``percentile``-th percentile of |diff|.
    ``limits`` = (map limit, difference limit) replaces both, so that several figures share one
    colour scale (:func:`overlay_limits` computes them over all their maps).
    """
    ov = _overlay_maps(images, class_names, labels, maps_before, maps_after, percentile, limits)
    n = len(ov.images)
    cols = 1 + len(ov.panels) + (ov.diff is not None)
    fig = Figure(figsize=(2.3 * cols + 0.6, 2.3 * max(n, 1) + 1.5), layout="constrained")
    axes = fig.subplots(max(n, 1), cols, squeeze=False)
    im_map = _draw_overlay_rows(axes, ov)
    _overlay_titles_and_bars(fig, axes, ov, im_map, percentile)
    return _save(fig, path)
