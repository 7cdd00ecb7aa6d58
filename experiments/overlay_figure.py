"""Before/after gradient overlays of fine-tuning runs, for docs (the report's figure).

    python experiments/overlay_figure.py --before CK --after RUN1/last.pth.tar RUN2/last.pth.tar \
        --diagnosis RUN/../start/diagnosis.safetensors --data-dir DATA --out docs/a.png docs/b.png

One figure per ``--after`` checkpoint, all on one colour scale (the limits over every figure's
maps, :func:`md_plugin.report.plots.overlay_limits`), so the figures compare directly.

The first training image of each of ``--classes`` classes (training images: nothing here is a
result), the true-class gradient map at the diagnosed layer before and after, drawn by
:func:`md_plugin.report.plots.plot_gradient_overlays`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import md_plugin  # noqa: F401
from md_plugin.checkpoint import load_weights
from md_plugin.cli import _setup
from md_plugin.data.datasets import get_class_names, get_targets
from md_plugin.doctor import Diagnosis
from md_plugin.report.gradmaps import spatial_gradient_maps
from md_plugin.report.plots import overlay_limits, plot_gradient_overlays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--before", required=True)
    p.add_argument("--after", nargs="+", required=True, help="one checkpoint per figure")
    p.add_argument("--diagnosis", required=True)
    p.add_argument("--dataset", default="torch/cifar10")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--out", nargs="+", required=True, help="one PNG per --after")
    a = p.parse_args()
    if len(a.out) != len(a.after):
        p.error(f"--out needs one file per --after: got {len(a.out)} for {len(a.after)}")
    torch.set_num_threads(1)
    ns = argparse.Namespace(
        model=a.model, checkpoint=a.before, num_classes=None, model_kwargs=[], dataset=a.dataset,
        data_dir=a.data_dir, split="train", imb_ratio=100.0, imb_type="exp", imb_seed=0,
        input_size=None, batch_size=128, workers=0,
    )  # fmt: skip
    model, ds, tf, k, _ = _setup(ns)
    targets = get_targets(ds)
    idx = [targets.index(c) for c in range(min(a.classes, k))]
    imgs = [ds[i][0] for i in idx]
    labels = [targets[i] for i in idx]
    x = torch.stack([tf(im) for im in imgs])
    shown = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in imgs])
    layer = Diagnosis.load(a.diagnosis).layer_names[0]
    before = spatial_gradient_maps(model, dict(model.named_modules())[layer], x, labels, "none")
    afters = []
    for ck in a.after:
        load_weights(model, ck)
        afters.append(
            spatial_gradient_maps(model, dict(model.named_modules())[layer], x, labels, "none")
        )
    limits = overlay_limits(shown.shape[1:3], before, afters)
    for out, after in zip(a.out, afters):
        plot_gradient_overlays(
            out, shown, get_class_names(ds, k), labels, before, after, limits=limits
        )
        print(f"wrote {out} (colour limits {limits[0]:.4g}, difference {limits[1]:.4g})")


if __name__ == "__main__":
    main()
