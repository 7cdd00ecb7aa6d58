"""Build a Model Doctor report from a trained model: used by train_md.py and `md-doctor report`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data.targets import get_targets
from ..doctor import Diagnosis
from ..layers import resolve_layers
from .checkpoint import load_weights

__all__ = ["build_report", "write_treatment_report", "pick_samples"]


def pick_samples(
    targets: Sequence[int], num_classes: int, per_class: int = 1, max_rows: int = 10
) -> list[int]:
    """The first ``per_class`` dataset indices of each class, at most ``max_rows`` in all."""
    picked: list[int] = []
    seen = [0] * num_classes
    for i, t in enumerate(targets):
        if seen[t] < per_class:
            seen[t] += 1
            picked.append(i)
            if len(picked) >= max_rows:
                break
    return picked


def build_report(
    out_dir: str | Path,
    diagnosis: Diagnosis,
    class_names: Sequence[str],
    model_after: nn.Module | None = None,
    model_before: nn.Module | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    dataset=None,
    eval_transform: Callable | None = None,
    summary_rows: list[dict[str, Any]] | None = None,
) -> Path:
    """Figures + report.html. ``before``/``after`` hold ``per_class`` (%) and ``confusion``."""
    # lazy: md_plugin.report imports matplotlib (about a second), which only a report needs;
    # every train_md.py run imports this module
    from ..report import render_report, spatial_gradient_maps

    layers = {
        n: (ld.scores.float().numpy(), ld.masks.numpy()) for n, ld in diagnosis.layers.items()
    }
    kw: dict[str, Any] = {}
    if before is not None:
        kw["acc_before"] = np.asarray(before["per_class"], dtype=float)
        kw["cm_before"] = np.asarray(before["confusion"])
    if after is not None:
        kw["acc_after"] = np.asarray(after["per_class"], dtype=float)
        kw["cm_after"] = np.asarray(torch.as_tensor(after["confusion"]))
    ref_model = model_before or model_after
    if dataset is not None and eval_transform is not None and ref_model is not None:
        idx = pick_samples(get_targets(dataset), diagnosis.num_classes)
        imgs = [dataset[i][0] for i in idx]
        labels = [int(dataset[i][1]) for i in idx]
        x = torch.stack([eval_transform(im) for im in imgs])
        refs = [
            r
            for r in resolve_layers(ref_model, diagnosis.layer_names, tuple(x.shape[1:]))
            if r.spatial
        ]
        if refs:
            h, w = x.shape[-2:]
            shown = np.stack(
                [
                    np.asarray(im.convert("RGB").resize((w, h)), dtype=np.float32) / 255.0
                    for im in imgs
                ]
            )

            def maps(m: nn.Module | None):
                if m is None:
                    return None
                mod = dict(m.named_modules())[refs[0].name]
                return spatial_gradient_maps(
                    m, mod, x, labels, normalize="none", to_map=refs[0].spatial_map
                )

            kw["overlays"] = {
                "images": shown,
                "labels": np.asarray(labels),
                "maps_before": maps(model_before or model_after),
                "maps_after": maps(model_after) if model_before is not None else None,
                "layer": refs[0].name,
            }
    return render_report(
        out_dir, layers=layers, class_names=list(class_names), summary_rows=summary_rows, **kw
    )


def write_treatment_report(
    out_dir, doctor, model, before, after, class_names, train_base, eval_tf, args
) -> Path:
    """End-of-run report in train_md.py: before = the initial checkpoint, after = the final model."""
    doctor.capture.enabled = False
    model_before = None
    if args.initial_checkpoint:
        model_before = copy.deepcopy(model)
        load_weights(model_before, args.initial_checkpoint)
    rows = [
        {"": "top-1 (%)", "before": round(before["top1"], 2), "after": round(after["top1"], 2)},
        {"": "top-5 (%)", "before": round(before["top5"], 2), "after": round(after["top5"], 2)},
    ]
    return build_report(
        out_dir, doctor.diagnosis, class_names, model_after=model, model_before=model_before,
        before=before, after=after, dataset=train_base, eval_transform=eval_tf, summary_rows=rows,
    )  # fmt: skip
