#!/usr/bin/env python3
"""Lazy regularisation on real CIFAR-10: does ``--md-every 4`` keep the effect of ``every 1``?

A short fine-tuning of a trained ``resnet20_cifar`` checkpoint (``--checkpoint``; the docs' run
used the 30-epoch CIFAR-10 one, 90.47%), in three arms that differ only
in the Model Doctor setting, each over the same seeds (the same batches and crops per seed):

* ``ctl``  alpha = 0 (no Model Doctor term: the fine-tuning alone),
* ``k1``   alpha = 0.078 (official alpha=10 at batch 128), every optimizer step,
* ``k4``   alpha = 0.078 with ``ModelDoctor(every=4)``: the terms on every 4th step, weight x4.

Everything is fixed in advance: last conv (``layer3.2.conv2``), both official terms, SGD lr 0.01
(momentum 0.9, wd 5e-4) cosine-annealed per step to 0 over ``--steps``, ``--batch-size``, pad-4
random crop + horizontal flip, train-mode BN. The diagnosis is made once, on the first 10,000
TRAINING images (eval transforms, 50 per class, theta 0.2), and shared by all runs. At the end,
once per run, on the first ``--eval-images`` TEST images (eval mode, nothing is selected on
them): top-1 accuracy and the
irrelevant-channel share of ``docs/results.md`` -- the mean per-sample positive gradient of the
true-class logit w.r.t. the hooked layer, summed over the channels irrelevant to the true class,
divided by the same over all channels.

This uses the library API (``ModelDoctor.begin_step``), the pattern a user's own loop follows.

    OMP_NUM_THREADS=1 python experiments/md_every.py --out runs/md_every \
        --checkpoint CHECKPOINT --data-dir DATA
    python experiments/md_every.py --out experiments/results/md_every --summarize  # docs tables

The committed runs (docs/benchmarks.md) are in ``experiments/results/md_every/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # experiments/stats.py

import timm  # noqa: E402

import md_plugin  # noqa: E402,F401  (registers resnet20_cifar)
from md_plugin.checkpoint import load_weights  # noqa: E402
from md_plugin.doctor import Diagnosis, diagnose  # noqa: E402
from md_plugin.doctor.treatment import ModelDoctor  # noqa: E402
from md_plugin.layers import FeatureCapture, resolve_layers  # noqa: E402

ARMS = {"ctl": (0.0, 1), "k1": (0.078, 1), "k4": (0.078, 4)}


def load_cifar(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=train, download=False)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 32, 32]
    return x, torch.tensor(ds.targets)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad 4 with zeros + random 32x32 crop + horizontal flip (torchvision RandomCrop defaults)."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    off = torch.randint(0, 9, (b, 2), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        t, left = int(off[i, 0]), int(off[i, 1])
        crop = padded[i, :, t : t + 32, left : left + 32]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def make_model(checkpoint: str):
    model = timm.create_model("resnet20_cifar", num_classes=10)
    load_weights(model, checkpoint)
    return model


def evaluate(model, diag: Diagnosis, x, y, mean, std, batch: int = 500) -> dict:
    """Test top-1 and the true-class positive gradient mass on irrelevant / relevant channels."""
    model.eval()
    refs = resolve_layers(model, diag.layer_names, (3, 32, 32))
    masks = diag.layers[refs[0].name].masks.float()
    irr = rel = 0.0
    correct = 0
    with FeatureCapture(model, refs) as cap:
        for i in range(0, len(y), batch):
            xb, yb = normalise(x[i : i + batch], mean, std), y[i : i + batch]
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            (feat,) = cap.features()
            (g,) = torch.autograd.grad(logits, feat, F.one_hot(yb, 10).to(logits.dtype))
            pos = g.clamp_min(0).flatten(2).sum(2)  # [B, C]
            m = masks[yb]
            irr += float((pos * (1 - m)).sum())
            rel += float((pos * m).sum())
    n = len(y)
    return {
        "top1": 100.0 * correct / n,
        "irr_mass": irr / n,
        "rel_mass": rel / n,
        "irr_share": irr / (irr + rel),
    }


def run_arm(name: str, seed: int, args, data, diag: Diagnosis, mean, std) -> dict:
    alpha, every = ARMS[name]
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_model(args.checkpoint)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    md = ModelDoctor(model, diag, alpha=alpha, every=every, input_size=(3, 32, 32))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ytr), generator=gen)
    md_vals, steps_md = [], 0
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:  # cosine per step to 0
            g["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / args.steps))
        idx = order[step * args.batch_size : (step + 1) * args.batch_size]
        xb = normalise(augment(xtr[idx], gen), mean, std)
        yb = ytr[idx]
        due = md.active and md.begin_step(step)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if due:
            md_loss, parts = md.loss(logits, yb)
            loss = loss + md_loss
            md_vals.append(float(parts["md_channel"]))
            steps_md += 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    md.remove()
    ev = evaluate(model, diag, xte, yte, mean, std)
    return {
        "arm": name,
        "seed": seed,
        "alpha": alpha,
        "every": every,
        "steps": args.steps,
        "steps_with_md": steps_md,
        "md_channel_first": md_vals[0] if md_vals else None,
        "md_channel_last": md_vals[-1] if md_vals else None,
        "train_s_per_step": train_s / args.steps,
        "load_1m": round(os.getloadavg()[0], 2),
        **ev,
    }


LABELS = {
    "ctl": "ctl (alpha 0)",
    "k1": "k1 (alpha 0.078, every step)",
    "k4": "k4 (alpha 0.078, every 4th step, x4)",
}
PAIRS = (("k1", "ctl"), ("k4", "ctl"), ("k4", "k1"))
PAIRED_STATS = (  # name, value of a run, digits
    ("top-1 (points)", lambda r: r["top1"], 2),
    ("irrelevant share (points)", lambda r: 100 * r["irr_share"], 2),
    ("irrelevant mass", lambda r: r["irr_mass"], 3),
    ("relevant mass", lambda r: r["rel_mass"], 3),
)


def _ms(v: list[float], digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(v) < 2:
        return f"{v[0]:{sign}.{digits}f}"
    return f"{statistics.mean(v):{sign}.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def summarize(out: Path) -> str:
    """The two tables of docs/benchmarks.md ("Lazy regularisation on real CIFAR-10")."""
    from stats import fmt_ci, fmt_p, paired

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("run_*.json"))]
    start = json.loads((out / "start.json").read_text()) if (out / "start.json").exists() else None
    lines = [
        "| arm | seeds | test top-1 (%) | irrelevant share (%) | irrelevant mass | relevant mass "
        "| channel term, first -> last penalised step |",
        "|---|---|---|---|---|---|---|",
    ]
    if start:
        lines.append(
            f"| checkpoint (start) | - | {start['top1']:.2f} | {100 * start['irr_share']:.2f} | "
            f"{start['irr_mass']:.3f} | {start['rel_mass']:.3f} | - |"
        )
    by_arm: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    for arm, label in LABELS.items():
        rs = [by_arm[arm][s] for s in sorted(by_arm.get(arm, {}))]
        if not rs:
            continue
        md = "-"
        if rs[0]["md_channel_first"] is not None:
            md = (
                f"{_ms([r['md_channel_first'] for r in rs], 2)} -> "
                f"{_ms([r['md_channel_last'] for r in rs], 2)}"
            )
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in rs)} | "
            f"{_ms([r['top1'] for r in rs], 2)} | {_ms([100 * r['irr_share'] for r in rs], 2)} | "
            f"{_ms([r['irr_mass'] for r in rs], 3)} | {_ms([r['rel_mass'] for r in rs], 3)} | {md} |"
        )
    lines += [
        "",
        "| difference | statistic | per seed | mean ± SD | p (paired t, 2 df) | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in PAIRS:
        seeds = sorted(set(by_arm.get(a, {})) & set(by_arm.get(b, {})))
        if len(seeds) < 2:
            continue
        for name, value, digits in PAIRED_STATS:
            r = paired([value(by_arm[a][s]) for s in seeds], [value(by_arm[b][s]) for s in seeds])
            lines.append(
                f"| {a} − {b} | {name} | {' / '.join(f'{d:+.{digits}f}' for d in r.diffs)} | "
                f"{_ms(list(r.diffs), digits, signed=True)} | {fmt_p(r.p)} | "
                f"{fmt_ci(r.ci, digits)} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint", help="the trained resnet20_cifar checkpoint (runs only)")
    ap.add_argument("--data-dir", help="folder holding cifar-10-batches-py (runs only)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--eval-images", type=int, default=10000, help="first N test images")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="ctl,k1,k4")
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        print(summarize(out))
        return 0
    if not (args.checkpoint and args.data_dir):
        ap.error("the runs need --checkpoint and --data-dir (--summarize needs neither)")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    xtr, ytr = load_cifar(args.data_dir, True)
    xte, yte = load_cifar(args.data_dir, False)
    xte, yte = xte[: args.eval_images], yte[: args.eval_images]
    model = make_model(args.checkpoint)
    cfg = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    dpath = out / "diagnosis.safetensors"
    if dpath.exists():
        diag = Diagnosis.load(dpath)
    else:
        t0 = time.perf_counter()
        xd = normalise(xtr[:10000], mean, std)
        loader = [(xd[i : i + 500], ytr[i : i + 500]) for i in range(0, 10000, 500)]
        diag = diagnose(model, loader, "last_conv", num_classes=10, per_class=50, theta=0.2)
        diag.save(dpath)
        print(f"diagnosis {diag.layer_names} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (out / "start.json").exists():
        (out / "start.json").write_text(json.dumps(evaluate(model, diag, xte, yte, mean, std)))
    data = (xtr, ytr, xte, yte)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            path = out / f"run_{arm}_s{seed}.json"
            if path.exists():
                continue
            t0 = time.perf_counter()
            res = run_arm(arm, seed, args, data, diag, mean, std)
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            path.write_text(json.dumps(res))
            print(json.dumps(res), flush=True)
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
