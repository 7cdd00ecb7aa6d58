"""Irrelevant-share statistic (and accuracy) of final checkpoints on images the runs never fit.

Run once per finished run (the experiment scripts call it right after each training):

    python experiments/heldout_stats.py --checkpoint RUN/last.pth.tar --out RUN/heldout_stats.json \
        --diagnosis experiments/runs/round2_cifar10/start/diagnosis.safetensors \
        --data-dir DATA --split test --first 1000

It measures, on the first ``--first`` images of ``--split`` (eval transforms): the true-class
gradient's irrelevant share, irrelevant and relevant mass at the diagnosed layer
(:func:`md_plugin.doctor.shares.gradient_shares`) and the top-1 accuracy on those images.
``--val-from-train N`` takes the images from that stratified hold-out of the training split instead
(CIFAR-10-LT). Nothing is selected here: every run is measured.
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
from md_plugin.data.datasets import TransformedDataset
from md_plugin.doctor import Diagnosis
from md_plugin.doctor.shares import gradient_shares


def _stats(model, loader, diag, input_size, k) -> dict:
    r = gradient_shares(model, loader, diag, input_size=input_size)
    correct = (r["preds"] == r["targets"]).float()
    per_class = [
        float(correct[r["targets"] == c].mean() * 100) if (r["targets"] == c).any() else None
        for c in range(k)
    ]
    share_pc = [
        float(r["share"][r["targets"] == c].mean()) if (r["targets"] == c).any() else None
        for c in range(k)
    ]
    return {
        "images": int(len(r["share"])),
        "top1": float(correct.mean() * 100),
        "per_class_top1": per_class,
        "irr_share": float(r["share"].mean()),
        "irr_share_per_class": share_pc,
        "irr_mass": float(r["irr_mass"].mean()),
        "rel_mass": float(r["rel_mass"].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--diagnosis", required=True)
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--dataset", default="torch/cifar10")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--imb-ratio", type=float, default=100.0)
    p.add_argument("--split", default="test")
    p.add_argument("--val-from-train", default=None)
    p.add_argument("--first", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    ns = argparse.Namespace(
        model=a.model, checkpoint=a.checkpoint, num_classes=None, model_kwargs=[], dataset=a.dataset,
        data_dir=a.data_dir, split="train" if a.val_from_train else a.split,
        imb_ratio=a.imb_ratio, imb_type="exp", imb_seed=0, input_size=None, batch_size=128,
        workers=0,
    )  # fmt: skip
    model, ds, tf, k, data_config = _setup(ns)
    idx = list(range(len(ds)))
    if a.val_from_train:
        from md_plugin.data.datasets import get_targets
        from md_plugin.data.split import stratified_split

        _, held = stratified_split(get_targets(ds), a.val_from_train, 0)
        idx = sorted(int(i) for i in held)
    if a.first:
        idx = idx[: a.first]
    loader = DataLoader(Subset(TransformedDataset(ds, tf), idx), batch_size=128, shuffle=False)
    diag = Diagnosis.load(a.diagnosis)
    t0 = time.time()
    res = _stats(model, loader, diag, data_config["input_size"], k)
    res.update(
        checkpoint=a.checkpoint,
        split="val_from_train" if a.val_from_train else a.split,
        diagnosis=a.diagnosis,
        seconds=round(time.time() - t0, 1),
    )
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k_: v for k_, v in res.items() if "per_class" not in k_}))


if __name__ == "__main__":
    main()
