#!/usr/bin/env python3
"""Diagnosis throughput relative to plain training throughput over the same images.

A fixed set of ``--images`` synthetic CIFAR-sized images (default 2048) is cut into batches
once. For each model and layer set, in one process and interleaved (order rotating):

* ``train``     one training pass: forward (train mode), CE, backward, SGD step per batch;
* ``diagnose``  ``md_plugin.doctor.diagnose`` over the same batches (eval mode, one
  ``autograd.grad`` w.r.t. the hooked outputs per batch, top-N buffer per class).

Labels are the model's own eval-mode predictions (after spreading them over all classes, see
``balanced_predictions``), so every image counts as "correctly classified" and enters the
per-class top-N buffer: the worst case for the buffer work (a random model with random labels
would keep only ~10% of the images).

It reports images/s of both, the median over ``--repeats`` passes of the per-pass time ratio
diagnose / train (min-max), and peak memory of one diagnosis batch vs one training step (bytes
through PyTorch's CPU allocator). Goal: ratio <= 1 (diagnosing N images costs no more than one
training pass over them). Last line: ``RESULT {json}``.

    python benchmarks/bench_diagnosis.py
    python benchmarks/bench_diagnosis.py --models resnet32_cifar --images 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import md_plugin  # noqa: E402,F401  (registers resnet32_cifar)
from benchmarks._common import (  # noqa: E402
    Precision,
    add_device_args,
    device_peak_bytes,
    interleaved,
    machine_info,
    parse_device_args,
    ratio_stats,
    synchronize,
)
from benchmarks.bench_treatment import MODEL_KWARGS, NUM_CLASSES, PRESETS  # noqa: E402
from md_plugin.doctor import diagnose  # noqa: E402


def balanced_predictions(model, images: torch.Tensor) -> torch.Tensor:
    """Make a random model's predictions cover every class, and return them as the labels.

    A freshly initialised network predicts one or two classes for everything. Standardising each
    logit over the image set (an affine change of the classifier: w_k /= s_k, b_k = (b_k - m_k) /
    s_k) spreads the argmax over all classes, so every class gets "correct" images and the
    per-class buffers do their full work.
    """
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
        mu, sd = logits.mean(0), logits.std(0).clamp_min(1e-6)
        fc = model.get_classifier()
        fc.weight.div_(sd[:, None])
        fc.bias.sub_(mu).div_(sd)
        labels = torch.cat(
            [model(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)]
        )
    return labels


def run_set(model, opt, batches, layers: list[str], args, prec=None) -> dict:
    """Interleaved training passes and diagnosis passes over ``batches``; one layer set."""
    s = args.input_size
    n_images = sum(len(y) for _, y in batches)
    dev = batches[0][0].device
    prec = prec or Precision("fp32", dev)

    def train_step(x, y) -> None:
        opt.zero_grad(set_to_none=True)
        with prec.autocast():
            loss = F.cross_entropy(model(x), y)
        prec.step(loss, opt)

    def train_pass() -> None:
        model.train()
        for x, y in batches:
            train_step(x, y)
        opt.zero_grad(set_to_none=True)
        synchronize(dev)

    def diag_pass(data=batches) -> None:
        with warnings.catch_warnings(), prec.autocast():
            warnings.simplefilter("ignore")  # e.g. classes without a correct image
            diagnose(
                model, data, layers, NUM_CLASSES, per_class=args.per_class, input_size=(3, s, s)
            )
        synchronize(dev)

    times = interleaved({"train": train_pass, "diagnose": diag_pass}, args.repeats, args.warmup)
    stats = ratio_stats(times, base="train")
    mem = {}
    if not args.no_memory:
        x0, y0 = batches[0]
        model.train()
        opt.zero_grad(set_to_none=True)
        mem["train"] = device_peak_bytes(lambda: train_step(x0, y0), dev)
        opt.zero_grad(set_to_none=True)
        mem["diagnose"] = device_peak_bytes(lambda: diag_pass([(x0, y0)]), dev)
    return {
        "layers": layers,
        "precision": prec.name,
        "train_img_s": n_images / stats["train"]["median_s"],
        "diag_img_s": n_images / stats["diagnose"]["median_s"],
        "ratio": stats["diagnose"]["ratio"],
        "ratio_min": stats["diagnose"]["ratio_min"],
        "ratio_max": stats["diagnose"]["ratio_max"],
        "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "peak_mib": {k: v / 2**20 for k, v in mem.items()},
        "mem_ratio": mem["diagnose"] / mem["train"] if mem else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="resnet32_cifar,resnet18")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5, help="measured passes of each kind")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default=None, help="comma list for every model (default: presets)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    device = parse_device_args(ap, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine_info(device)
    print("machine:", json.dumps(info))
    t_start = time.perf_counter()
    results = {}
    s = args.input_size
    for model_name in [m for m in args.models.split(",") if m]:
        model = timm.create_model(
            model_name, num_classes=NUM_CLASSES, **MODEL_KWARGS.get(model_name, {})
        )
        model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.images, 3, s, s, generator=gen).to(device)
        labels = balanced_predictions(model, images)
        print(f"  {model_name}: labels per class {torch.bincount(labels, minlength=10).tolist()}")
        batches = [
            (images[i : i + args.batch_size], labels[i : i + args.batch_size])
            for i in range(0, args.images, args.batch_size)
        ]
        preset = args.layers.split(",") if args.layers else PRESETS.get(model_name, ["last_conv"])
        layer_sets = {"last conv": [preset[0]], "3 stages": preset}
        if len(preset) == 1:
            layer_sets = {"layers": preset}
        rows = []
        for prec_name in args.amp:
            for set_name, layers in layer_sets.items():
                row = run_set(model, opt, batches, layers, args, Precision(prec_name, device))
                row["met"] = row["ratio"] <= 1.0
                rows.append((f"{prec_name} {set_name}", row))
                print(
                    f"  {model_name} {prec_name} {set_name}: diagnose/train {row['ratio']:.2f}x "
                    f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
                    flush=True,
                )
        print(
            f"\n== {model_name}: {args.images} images, batch {args.batch_size}, "
            f"{args.repeats} passes each =="
        )
        hdr = (
            f"{'hooked layers':<58}{'train img/s':>12}{'diag img/s':>12}"
            f"{'diag/train time':>24}{'peak mem diag/train':>22}{'goal <=1':>10}"
        )
        print(hdr)
        print("-" * len(hdr))
        for set_name, r in rows:
            label = f"{set_name}: {','.join(r['layers'])}"
            rng = f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            mr = f"{r['mem_ratio']:.2f}" if r["mem_ratio"] is not None else "-"
            print(
                f"{label:<58}{r['train_img_s']:>12.0f}{r['diag_img_s']:>12.0f}{rng:>24}"
                f"{mr:>22}{'met' if r['met'] else 'MISSED':>10}"
            )
        results[model_name] = [dict(r, set=n) for n, r in rows]
    print(
        "\ndiag/train: median over passes of (diagnosis pass time / training pass time over the "
        "same images, adjacent in time), (min-max) over passes; peak mem: one batch, bytes "
        "through the allocator"
    )
    summary = {
        "bench": "diagnosis",
        "machine": info,
        "args": vars(args),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "results": results,
    }
    print("RESULT " + json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
