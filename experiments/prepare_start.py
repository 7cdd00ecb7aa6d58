"""Diagnose a start checkpoint on training images and fix the share arm's alpha by rule.

Run once per start point, before any fine-tuning (training images only; no test image is read):

    python experiments/prepare_start.py --checkpoint CK --dataset torch/cifar10 \
        --data-dir DATA --first 10000 --out experiments/runs/i12_cifar10/start

1. Diagnosis (last conv, 50 images per class, theta 0.2; ranked by the non-saturating
   log-odds) on the first ``--first`` training images (eval transforms), saved as
   ``diagnosis.safetensors``.
2. The three channel terms on the first ``--penalty-images`` training images (eval mode, no
   training): official, true_only (irrelevant mass) and share. The share arm's alpha is set so
   that its initial penalty equals the official arm's: ``alpha_share = alpha * official / share``
   (rounded to 2 significant digits), written to ``alpha.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import md_plugin  # noqa: F401
from md_plugin.cli import _setup
from md_plugin.data.datasets import TransformedDataset, get_class_names
from md_plugin.doctor import diagnose
from md_plugin.doctor.treatment import ModelDoctor
from md_plugin.train.tables import format_diagnosis_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="torch/cifar10")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--imb-ratio", type=float, default=100.0)
    p.add_argument("--val-from-train", default=None, help="exclude this stratified hold-out")
    p.add_argument("--first", type=int, default=10000, help="training images to diagnose on")
    p.add_argument("--penalty-images", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=0.078, help="the official arm's alpha")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    ns = argparse.Namespace(
        model=a.model, checkpoint=a.checkpoint, num_classes=None, model_kwargs=[],
        dataset=a.dataset, data_dir=a.data_dir, split="train", imb_ratio=a.imb_ratio,
        imb_type="exp", imb_seed=0, input_size=None, batch_size=128, workers=0,
    )  # fmt: skip
    model, ds, tf, k, data_config = _setup(ns)
    keep = list(range(len(ds)))
    if a.val_from_train:
        from md_plugin.data.datasets import get_targets
        from md_plugin.data.split import stratified_split

        keep, _ = stratified_split(get_targets(ds), a.val_from_train, 0)
        keep = sorted(int(i) for i in keep)
    idx = keep[: a.first]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    loader = DataLoader(Subset(TransformedDataset(ds, tf), idx), batch_size=128, shuffle=False)
    diag = diagnose(model, loader, "last_conv", k, per_class=50, theta=0.2,
                    input_size=data_config["input_size"])  # fmt: skip
    diag.save(out / "diagnosis.safetensors")
    t_diag = time.time() - t0
    print(format_diagnosis_table(diag, get_class_names(ds, k)))
    print(f"diagnosis on {len(idx)} training images: {t_diag:.0f} s")

    t0 = time.time()
    md = ModelDoctor(
        model,
        diag,
        alpha=0.0,
        monitor=True,
        capture_eval=True,
        input_size=data_config["input_size"],
    )
    model.eval()
    sums = {"md_channel": 0.0, "md_irr_mass": 0.0, "md_irr_share": 0.0}
    n = 0
    sub = DataLoader(Subset(TransformedDataset(ds, tf), idx[: a.penalty_images]), batch_size=128)
    for x, y in sub:
        _, parts = md.loss(model(x), y)
        for key in sums:
            sums[key] += float(parts[key]) * len(y)
        n += len(y)
    md.remove()
    vals = {key: v / n for key, v in sums.items()}
    alpha_share = float(f"{a.alpha * vals['md_channel'] / vals['md_irr_share']:.2g}")
    res = {
        "checkpoint": a.checkpoint,
        "diagnosis_images": len(idx),
        "penalty_images": n,
        "official": vals["md_channel"],
        "true_only": vals["md_irr_mass"],
        "share": vals["md_irr_share"],
        "alpha_official": a.alpha,
        "alpha_true_only": a.alpha,
        "alpha_share": alpha_share,
        "diagnosis_seconds": round(t_diag, 1),
        "penalty_seconds": round(time.time() - t0, 1),
    }
    (out / "alpha.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
