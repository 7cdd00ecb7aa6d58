#!/usr/bin/env python3
"""Per-step host reads of the logged losses vs device-side sums (``engine.RunningSums``).

A pass of ``--steps`` Model Doctor training steps (CE + ``ModelDoctor.loss``, backward, SGD),
timed as a whole with one device synchronisation at the end, in two variants interleaved pass
by pass:

* ``reads``    after each step, the loss, the CE and the four Model Doctor parts are read to
  Python floats and summed (what the trainer did before: 6 host reads per step);
* ``device``   the same values are added to a ``RunningSums`` on the device and read once at
  the end of the pass (what the trainer does now).

Both keep the trainer's two per-step finite checks out of the picture (they are the same in
both). On a CPU a read waits for nothing, so the ratio should be ~1; on a GPU each read stops
the host from queuing the next step's kernels until the device has drained. Last line:
``RESULT {json}``.

    python benchmarks/bench_reads.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import md_plugin  # noqa: E402,F401
from benchmarks._common import (  # noqa: E402
    fmt_ratio,
    interleaved,
    machine_info,
    ratio_stats,
    synchronize,
)
from benchmarks.bench_treatment import NUM_CLASSES, random_diagnosis  # noqa: E402
from md_plugin.doctor.treatment import ModelDoctor  # noqa: E402
from md_plugin.layers import resolve_layers  # noqa: E402
from md_plugin.train.engine import RunningSums  # noqa: E402

KEYS = ("loss", "ce", "md_channel", "md_spatial", "md_irr_mass", "md_irr_share")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet32_cifar")
    ap.add_argument("--layer", default="last_conv")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info(device)
    print("machine:", json.dumps(info))
    s, b = args.input_size, args.batch_size
    model = timm.create_model(args.model, num_classes=NUM_CLASSES).train().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    refs = resolve_layers(model, [args.layer], (3, s, s))
    diag = random_diagnosis(model, refs, torch.Generator().manual_seed(1))
    md = ModelDoctor(model, diag, alpha=10.0 / b, input_size=(3, s, s))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, s, s, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device)

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        md_loss, parts = md.loss(logits, y)
        loss = ce + md_loss
        loss.backward()
        opt.step()
        return {"loss": loss, "ce": ce, **parts}

    def with_reads() -> None:
        sums = dict.fromkeys(KEYS, 0.0)
        for _ in range(args.steps):
            vals = step()
            for k in KEYS:
                if k in vals:
                    sums[k] += float(vals[k].detach()) * b
        synchronize(device)

    def on_device() -> None:
        sums = RunningSums(dict.fromkeys(KEYS, 0.0))
        for _ in range(args.steps):
            sums.add(b, step())
        sums.read()
        synchronize(device)

    times = interleaved({"reads": with_reads, "device": on_device}, args.repeats, args.warmup)
    stats = ratio_stats(times, base="reads")
    for st in stats.values():
        st["img_s"] = b * args.steps / st["median_s"]
    print(
        f"\n== {args.model} {refs[0].name}, batch {b}, {args.steps} steps per pass: "
        f"device-side sums vs per-step reads =="
    )
    print(
        f"reads {stats['reads']['img_s']:.0f} img/s, device {stats['device']['img_s']:.0f} img/s, "
        f"device / reads time {fmt_ratio(stats['device'])}"
    )
    print(
        "RESULT "
        + json.dumps(
            {"bench": "reads", "machine": info, "args": vars(args), "time": stats},
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
