"""Assemble a report folder from whatever diagnosis/treatment data is at hand.

Callers (``md-doctor report``, the trainer) pass plain arrays; every missing piece is simply
skipped, so a diagnosis-only run and a full before/after run use the same entry point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .html import ReportFigure, Section, write_report_html
from .plots import (
    as_percent,
    jaccard_matrix,
    plot_accuracy_bars,
    plot_confusion_pair,
    plot_gradient_overlays,
    plot_jaccard,
    plot_relevance_heatmap,
)

__all__ = ["render_report", "safe_file_stem"]

_HEATMAP_CAPTION = (
    "Rows are classes, columns are the channels of {layer} in their original order. Colour is "
    "the diagnosis score (the class logit's gradient on that channel, aggregated over "
    "confidently classified training images), rescaled within each row from 0 (least) to 1 "
    "(most relevant channel for that class). Red outlines mark the channels the diagnosis "
    "judged relevant to the class (its mask); treatment penalises gradients on all other "
    "channels. A healthy layer shows a few outlined, mostly different channels per row."
)
_JACCARD_CAPTION = (
    "Each cell is the Jaccard overlap of two classes' relevant-channel sets at {layer} "
    "(channels shared / channels used by either). The diagonal is 1 by definition. Bright "
    "off-diagonal cells mark class pairs that rely on the same channels, often the pairs the "
    "model confuses. A class with no relevant channel scores 0 against every other class."
)
_ACC_CAPTION = (
    "Per-class test accuracy before (grey) and after (blue) treatment. Dashed lines and the "
    "legend give the unweighted mean over classes. Look for gains on the classes that were "
    "worst before, and check that the other classes did not drop."
)
_CM_CAPTION = (
    "Rows are true classes, columns predicted classes; each row is divided by the number of "
    "samples of its class, so it sums to 1 regardless of class size. The diagonal is per-class "
    "accuracy; off-diagonal cells show where a class's samples go instead. The colour scale is "
    "square-root so that confusions of a few percent stay visible. Treatment should brighten "
    "the diagonal and fade the off-diagonal cells."
)
_OVERLAY_CAPTION = (
    "One sample per row, its true class on the left (with the change in total gradient mass when "
    "there is an after map). Each overlay shows where the positive gradient of the true-class "
    "logit at {layer} sits, summed over channels, as each map's share of its own total: a "
    "treatment that only shrinks every gradient leaves it unchanged. Colours are perceptually "
    "uniform (bright = more), clipped at a high percentile shared by before and after. The last "
    "column is after minus before: red where the gradient's share grew, blue where it shrank. "
    "After a successful treatment, red should sit on the object and blue on the background."
)


def safe_file_stem(name: str) -> str:
    """A file-name-safe stem for a layer name such as ``layer3.*.conv2``."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return stem[:80] or "layer"


def _unique(stem: str, used: set[str]) -> str:
    """Different layer names can map to the same stem (``a.b`` and ``a*b``): number them."""
    candidate, i = stem, 2
    while candidate in used:
        candidate, i = f"{stem}-{i}", i + 1
    used.add(candidate)
    return candidate


def _layer_summary(name: str, masks: np.ndarray) -> dict[str, object]:
    masks = np.asarray(masks, dtype=bool)
    per_class = masks.sum(axis=1)
    jac = jaccard_matrix(masks)
    off = jac[~np.eye(jac.shape[0], dtype=bool)]
    return {
        "layer": name,
        "classes": masks.shape[0],
        "channels": masks.shape[1],
        "relevant / class (mean)": float(per_class.mean()),
        "relevant / class (min-max)": f"{per_class.min()}-{per_class.max()}",
        "classes with none": int((per_class == 0).sum()),
        "mean Jaccard between classes": float(off.mean()) if off.size else float("nan"),
    }


def _accuracy_summary(before: np.ndarray, after: np.ndarray | None) -> list[dict[str, object]]:
    b = as_percent(before)
    rows: list[dict[str, object]] = [
        {"metric": "mean per-class accuracy (%)", "before": float(b.mean())},
        {"metric": "worst class accuracy (%)", "before": float(b.min())},
    ]
    if after is not None:
        a = as_percent(after)
        rows[0].update(after=float(a.mean()), change=float(a.mean() - b.mean()))
        rows[1].update(after=float(a.min()), change=float(a.min() - b.min()))
        rows.append({"metric": "classes improved / worse", "before": "", "after": "",
                     "change": f"{int((a > b).sum())} / {int((a < b).sum())}"})  # fmt: skip
    return rows


def render_report(
    out_dir: str | Path,
    *,
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    acc_before: np.ndarray | None = None,
    acc_after: np.ndarray | None = None,
    cm_before: np.ndarray | None = None,
    cm_after: np.ndarray | None = None,
    overlays: Mapping[str, object] | None = None,
    summary_rows: Sequence[Mapping[str, object]] | None = None,
    title: str = "Model Doctor report",
) -> Path:
    """Draw every figure the given data allows into ``out_dir`` and write ``report.html``.

    ``layers`` maps a layer name to its diagnosis ``(scores, masks)``, both [classes,
    channels]. Accuracies are per class (fractions or percent); confusion matrices are counts
    [true, predicted]. ``overlays`` holds ``images`` [N, H, W, 3] in [0, 1], ``labels`` [N],
    ``maps_before`` [N, h, w], optionally ``maps_after`` and ``layer`` (name for the caption).
    ``summary_rows`` is a free-form table shown first. Returns the path of report.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in class_names]
    sections: list[Section] = []

    if summary_rows:
        sections.append(Section("Summary", tables=[list(summary_rows)]))

    if layers:
        used: set[str] = set()
        diag_rows = [_layer_summary(name, masks) for name, (_, masks) in layers.items()]
        sections.append(
            Section(
                "Diagnosis",
                text="Which channels of each diagnosed layer the diagnosis links to each class.",
                tables=[diag_rows],
            )
        )
        for name, (scores, masks) in layers.items():
            stem = _unique(safe_file_stem(name), used)
            heat = plot_relevance_heatmap(out / f"heatmap_{stem}.png", scores, masks, names, name)
            jac = plot_jaccard(out / f"jaccard_{stem}.png", masks, names, name)
            sections.append(
                Section(
                    f"Layer {name}",
                    figures=[
                        ReportFigure(heat.name, _HEATMAP_CAPTION.format(layer=name)),
                        ReportFigure(jac.name, _JACCARD_CAPTION.format(layer=name)),
                    ],
                )
            )

    treatment: list[ReportFigure] = []
    tables: list[list[dict[str, object]]] = []
    if acc_after is not None and acc_before is None or cm_after is not None and cm_before is None:
        raise ValueError("an 'after' accuracy or confusion matrix needs its 'before' counterpart")
    if acc_before is not None:
        bars = plot_accuracy_bars(out / "accuracy.png", acc_before, acc_after, names)
        treatment.append(ReportFigure(bars.name, _ACC_CAPTION))
        tables.append(_accuracy_summary(acc_before, acc_after))
    if cm_before is not None:
        cms = plot_confusion_pair(out / "confusion.png", cm_before, cm_after, names)
        treatment.append(ReportFigure(cms.name, _CM_CAPTION))
    if treatment:
        treated = acc_after is not None or cm_after is not None
        heading = "Treatment: before vs after" if treated else "Accuracy (before treatment)"
        sections.append(Section(heading, figures=treatment, tables=tables))

    if overlays is not None:
        layer = str(overlays.get("layer", "the diagnosed layer"))
        ov = plot_gradient_overlays(
            out / "gradient_overlays.png",
            overlays["images"],
            names,
            overlays["labels"],
            overlays["maps_before"],
            overlays.get("maps_after"),
        )
        sections.append(
            Section(
                "Where the class evidence sits",
                figures=[ReportFigure(ov.name, _OVERLAY_CAPTION.format(layer=layer))],
            )
        )

    return write_report_html(out, title, sections)
