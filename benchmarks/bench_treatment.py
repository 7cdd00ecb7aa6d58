#!/usr/bin/env python3
"""Cost of a Model Doctor training step relative to a plain cross-entropy step.

For each model and hooked layer (the last conv of the last, middle and first stage that still
has a spatial map), with and without the spatial term, it times in one process, interleaved
round by round (order rotating):

* ``plain``   CE step: forward, backward, SGD step;
* ``ours``    CE + ``ModelDoctor.loss`` (two ``autograd.grad`` calls, spatial term reuses G(y));
* ``batched`` the same with ``batched=True`` (one vmapped ``autograd.grad`` for both classes);
* ``naive``   CE + the official-style reference (``benchmarks/naive_reference.py``: a separate
  ``autograd.grad`` per term, three with the spatial term, per-sample Python loops);
* ``per_layer`` (opt-in, ``--variants naive,per_layer``) the naive reference with one
  ``autograd.grad`` per layer and term, as the lab fork does: only differs for several layers
  (a glob such as ``--layers 'layer3.*.conv2'`` targets every match);
* ``every_k`` (opt-in, ``--md-every 2,4,8``) lazy regularisation, ``ModelDoctor(every=k)``: the
  **average** step cost of a cycle of k optimizer steps run as the trainer runs them
  (``begin_step``; the terms on the first step with weight k, none on the others). By default a
  round times one penalised step (``ours``, the same work as a due step) and one step that is not
  due (``lazy_skip``: hooks idle, no terms) and the cycle's average is
  ``(ours + (k - 1) * lazy_skip) / k`` of that round; ``--md-every-cycles`` instead times the k
  steps of a whole cycle per round (k times the work; the GPU script does that). Compare with
  ``1 + (r - 1) / k`` from the ratio r of ``ours``.

It reports the median over ``--steps`` rounds of the per-round time ratio to ``plain`` (with the
min-max range), the peak step memory ratio (bytes through PyTorch's CPU allocator, see
``_common.peak_bytes``), and a numerical check that ours equals the naive reference after the
mapping alpha_ours = alpha_official / B, beta_ours = beta_official (loss and parameter gradients
of the MD loss, max relative difference). Last line: ``RESULT {json}``.

    python benchmarks/bench_treatment.py                       # full default matrix
    python benchmarks/bench_treatment.py --models resnet32_cifar --layers layer3.4.conv2 \
        --spatial off --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import md_plugin  # noqa: E402,F401  (registers resnet32_cifar)
from benchmarks._common import (  # noqa: E402
    Precision,
    add_device_args,
    device_peak_bytes,
    fmt_ratio,
    interleaved,
    machine_info,
    parse_device_args,
    ratio_stats,
    synchronize,
)
from benchmarks.naive_reference import NaiveModelDoctor, map_official_to_ours  # noqa: E402
from md_plugin.doctor import Diagnosis, LayerDiagnosis, model_fingerprint  # noqa: E402
from md_plugin.doctor.treatment import ModelDoctor  # noqa: E402
from md_plugin.layers import resolve_layers  # noqa: E402

# last conv of the last / middle / first stage that still has a spatial map at 32 px
PRESETS = {
    "resnet32_cifar": ["layer3.4.conv2", "layer2.4.conv2", "layer1.4.conv2"],
    # at 32 px timm's resnet18 reaches 1x1 in layer4, so its last spatial conv is in layer3
    "resnet18": ["layer3.1.conv2", "layer2.1.conv2", "layer1.1.conv2"],
}
MODEL_KWARGS = {"resnet18": {"zero_init_last": False}}  # else the hooked gradients are all 0
NUM_CLASSES = 10
ALPHA_OFF, BETA_OFF = 10.0, 1.0  # official script's alpha; beta only needs to be > 0


def random_fg_masks(b: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rectangle per image (1 = object), and a random half of the batch annotated."""
    m = torch.zeros(b, 1, size, size)
    for i in range(b):
        h, w = (int(v) for v in torch.randint(size // 4, size, (2,), generator=gen))
        top = int(torch.randint(0, size - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
        m[i, 0, top : top + h, left : left + w] = 1.0
    has = torch.zeros(b, dtype=torch.bool)
    has[torch.randperm(b, generator=gen)[: b // 2]] = True
    return m, has


def random_diagnosis(model, refs, gen: torch.Generator) -> Diagnosis:
    """Random relevant-channel masks (about half the channels per class): cost does not depend
    on which channels are marked, and a random model has no meaningful diagnosis anyway."""
    layers = {}
    for r in refs:
        scores = torch.rand(NUM_CLASSES, r.channels, generator=gen)
        layers[r.name] = LayerDiagnosis(r.name, scores, scores > 0.5)
    counts = torch.full((NUM_CLASSES,), 50)
    return Diagnosis(layers, counts, model_fingerprint(model, refs))


def max_rel_diff(a: list, b: list) -> float:
    """max over tensors of max|a-b| / max|b| (a missing gradient counts as zeros)."""
    worst = 0.0
    for u, v in zip(a, b):
        if u is None and v is None:
            continue
        u = torch.zeros_like(v) if u is None else u
        v = torch.zeros_like(u) if v is None else v
        scale = v.abs().max().item()
        diff = (u - v).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def equality_check(md_loss, variants, skip, params, spatial, mods, masks) -> dict:
    """Ours (and the other variants) vs the naive official reference: loss and MD gradients."""
    check = {}
    _, l_ref, p_ref = md_loss("naive")
    g_ref = torch.autograd.grad(l_ref, params, allow_unused=True)
    if spatial:  # the exact mapping needs the same mask resize (ours: area, official: bilinear)
        naive_area = NaiveModelDoctor(mods, masks, ALPHA_OFF, BETA_OFF, resize="area")
        variants["naive_area"] = naive_area
        _, l_area, p_area = md_loss("naive_area")
        g_area = torch.autograd.grad(l_area, params, allow_unused=True)
        check["spatial_bilinear_vs_area_rel"] = abs(
            p_ref["spatial"].item() - p_area["spatial"].item()
        ) / max(abs(p_ref["spatial"].item()), 1e-30)
        l_ref, g_ref = l_area, g_area
        naive_area.remove()
        del variants["naive_area"]
    for name in [n for n in variants if n != "naive" and n not in skip]:
        _, l_v, _ = md_loss(name)
        g_v = torch.autograd.grad(l_v, params, allow_unused=True)
        check[f"{name}_loss_rel"] = abs(l_v.item() - l_ref.item()) / max(abs(l_ref.item()), 1e-30)
        check[f"{name}_grad_rel"] = max_rel_diff(g_v, g_ref)
    check["loss_value"] = l_ref.item()
    return check


def run_config(model, opt, x, y, fg, has, layer: str, spatial: bool, args, prec=None) -> dict:
    b = x.shape[0]
    dev = x.device
    prec = prec or Precision("fp32", dev)
    exact = prec.name == "fp32"  # the references and the equality check run in fp32 only
    size = (3, args.input_size, args.input_size)
    gen = torch.Generator().manual_seed(1)
    refs = resolve_layers(model, [layer], size)
    ref = refs[0]
    diag = random_diagnosis(model, refs, gen)
    alpha, beta = map_official_to_ours(ALPHA_OFF, BETA_OFF if spatial else 0.0, b)
    variants = {"ours": ModelDoctor(model, diag, alpha, beta, input_size=size)}
    if "batched" in args.variants and exact:
        variants["batched"] = ModelDoctor(model, diag, alpha, beta, batched=True, input_size=size)
    mods = [r.module for r in refs]
    masks = [diag.layers[r.name].masks.to(dev) for r in refs]
    beta_off = BETA_OFF if spatial else 0.0
    if exact:
        variants["naive"] = NaiveModelDoctor(mods, masks, ALPHA_OFF, beta_off)
    if "per_layer" in args.variants and exact:
        variants["per_layer"] = NaiveModelDoctor(mods, masks, ALPHA_OFF, beta_off, per_layer=True)
    ks = [k for k in args.md_every if k > 1]
    if args.md_every_cycles:
        every = {
            f"every_{k}": ModelDoctor(model, diag, alpha, beta, every=k, input_size=size)
            for k in ks
        }
    else:  # one step that is not due stands for the k - 1 of every cycle
        every = (
            {"lazy_skip": ModelDoctor(model, diag, alpha, beta, every=2, input_size=size)}
            if ks
            else {}
        )
    variants.update(every)
    fgm, hm = (fg, has) if spatial else (None, None)

    def enable(name: str | None) -> None:
        for n, v in variants.items():
            if isinstance(v, ModelDoctor):
                v.capture.enabled = n == name
            else:
                v.enabled = n == name

    def md_loss(name: str):
        enable(name)
        v = variants[name]
        with prec.autocast():
            logits = model(x)
            if isinstance(v, ModelDoctor):
                md, parts = v.loss(logits, y, fgm, hm, grad_scale=prec.grad_scale())
            else:
                md, parts = v.loss(logits, y, fgm, hm)
        return logits, md, parts

    # -- numerical check (before any optimizer step of this config) --------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    check = equality_check(md_loss, variants, every, params, spatial, mods, masks) if exact else {}

    # -- timing ----------------------------------------------------------------------------
    def plain_step() -> None:
        enable(None)
        opt.zero_grad(set_to_none=True)
        with prec.autocast():
            loss = F.cross_entropy(model(x), y)
        prec.step(loss, opt)
        synchronize(dev)

    def make_md_step(name: str):
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            logits, md, _ = md_loss(name)
            with prec.autocast():
                loss = F.cross_entropy(logits, y) + md
            prec.step(loss, opt)
            synchronize(dev)

        return step

    def make_cycle(name: str):
        md = variants[name]

        def cycle() -> None:  # k optimizer steps, as train_one_epoch runs them
            enable(name)
            for i in range(md.every) if name != "lazy_skip" else (1,):  # 1: not due
                opt.zero_grad(set_to_none=True)
                due = md.begin_step(i)
                with prec.autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    if due:
                        loss = loss + md.loss(logits, y, fgm, hm, grad_scale=prec.grad_scale())[0]
                prec.step(loss, opt)
            synchronize(dev)

        return cycle

    fns = {"plain": plain_step}
    for name in ("ours", "batched", "naive", "per_layer"):
        if name in variants and (name == "ours" or name in args.variants):
            fns[name] = make_md_step(name)
    for name in every:
        fns[name] = make_cycle(name)
    load = [round(os.getloadavg()[0], 2)]
    times = interleaved(fns, args.steps, args.warmup)
    load.append(round(os.getloadavg()[0], 2))
    if "lazy_skip" in times:  # a cycle = one penalised step + (k - 1) steps that are not due
        for k in (k for k in args.md_every if k > 1):
            times[f"every_{k}"] = [
                (t1 + (k - 1) * t0) / k for t1, t0 in zip(times["ours"], times["lazy_skip"])
            ]
    else:
        for name, md in every.items():  # a cycle's time -> the average time of one of its steps
            times[name] = [t / md.every for t in times[name]]
    stats = ratio_stats(times)
    for st in stats.values():
        st["img_s"] = b / st["median_s"]

    # -- peak memory (one profiled step each, after timing) ----------------------------------
    mem = {}
    if not args.no_memory:
        for name, fn in fns.items():
            if name in every:
                continue
            opt.zero_grad(set_to_none=True)
            mem[name] = device_peak_bytes(fn, dev)
        opt.zero_grad(set_to_none=True)
    for v in variants.values():
        v.remove()
    enable(None)
    return {
        "layer": layer,
        "num_layers": len(refs),
        "shape": list(ref.out_shape[1:]),
        "spatial": spatial,
        "precision": prec.name,
        "load_1m": load,
        "time": stats,
        "times_s": {k: [round(t, 5) for t in v] for k, v in times.items()},
        "peak_mib": {k: v / 2**20 for k, v in mem.items()},
        "mem_ratio": {k: v / mem["plain"] for k, v in mem.items()} if mem else {},
        "check": check,
    }


def print_table(model_name: str, b: int, rows: list[dict], prec: str = "fp32") -> None:
    print(
        f"\n== {model_name}, batch {b}, {prec}: time and peak-memory ratios to a plain CE step =="
    )
    hdr = (
        f"{'layer':<16}{'C x H x W':<12}{'spatial':<8}{'plain ms':>9}{'plain img/s':>12}"
        f"{'ours img/s':>11}  {'ours':<18}{'batched':<18}{'naive':<18}{'ours/naive':>10}  "
        f"{'mem ours':>8}{'mem naive':>10}{'loss rel':>10}{'grad rel':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = r["time"]
        shape = "x".join(str(v) for v in r["shape"])
        bat = fmt_ratio(t["batched"]) if "batched" in t else "-"
        nai = fmt_ratio(t["naive"]) if "naive" in t else "-"
        on = t["ours"]["median_s"] / t["naive"]["median_s"] if "naive" in t else float("nan")
        mr = r["mem_ratio"]
        nan = float("nan")
        if "per_layer" in t:
            pl = t["per_layer"]
            print(
                f"{r['layer']:<16}({r['num_layers']} layers) naive, one call per layer and term: "
                f"{fmt_ratio(pl)}; ours/that {t['ours']['median_s'] / pl['median_s']:.2f}; "
                f"loss rel {r['check'].get('per_layer_loss_rel', float('nan')):.1e}"
            )
        print(
            f"{r['layer']:<16}{shape:<12}{'yes' if r['spatial'] else 'no':<8}"
            f"{t['plain']['median_s'] * 1e3:>9.1f}{t['plain']['img_s']:>12.0f}"
            f"{t['ours']['img_s']:>11.0f}  {fmt_ratio(t['ours']):<18}{bat:<18}{nai:<18}"
            f"{on:>10.2f}  {mr.get('ours', nan):>8.2f}{mr.get('naive', nan):>10.2f}"
            f"{r['check'].get('ours_loss_rel', nan):>10.1e}"
            f"{r['check'].get('ours_grad_rel', nan):>10.1e}"
        )


def print_every_table(
    model_name: str, b: int, rows: list[dict], ks: list[int], prec: str = "fp32"
) -> None:
    print(
        f"\n== {model_name}, batch {b}, {prec}: average step time of --md-every k vs a plain "
        "step (pred = 1 + (r - 1) / k from the k=1 ratio r) =="
    )
    cols = "".join(f"{'k=' + str(k):<18}{'pred':>6}  " for k in ks)
    hdr = f"{'layer':<16}{'spatial':<8}{'plain ms':>9}  {'lazy step':<18}{cols}{'load 1m':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = r["time"]
        cells = ""
        for k in ks:
            s = t["ours"] if k == 1 else t[f"every_{k}"]
            pred = 1 + (t["ours"]["ratio"] - 1) / k
            cells += f"{fmt_ratio(s):<18}{pred:>6.2f}  "
        load = "-".join(f"{v:.1f}" for v in r["load_1m"])
        lazy = fmt_ratio(t["lazy_skip"]) if "lazy_skip" in t else "-"
        print(
            f"{r['layer']:<16}{'yes' if r['spatial'] else 'no':<8}"
            f"{t['plain']['median_s'] * 1e3:>9.0f}  {lazy:<18}{cells}{load:>12}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="resnet32_cifar,resnet18")
    ap.add_argument("--layers", default=None, help="comma list for every model (default: presets)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="measured rounds (median over them)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core box 2 threads oversubscribe "
        "and the timings swing by several x)",
    )
    ap.add_argument("--spatial", choices=("both", "off", "on"), default="both")
    ap.add_argument("--variants", default="batched,naive", help="besides plain and ours")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiled memory steps")
    ap.add_argument(
        "--md-every",
        default="",
        help="comma list of k for lazy regularisation (e.g. 1,2,4,8): average step ratios",
    )
    ap.add_argument(
        "--md-every-cycles",
        action="store_true",
        help="time whole k-step cycles (default: one penalised + one lazy step per round)",
    )
    ap.add_argument("--seed", type=int, default=0)
    add_device_args(
        ap,
        "comma list of precisions: fp32, bf16, fp16 (fp16 = GradScaler + scaled cotangents); "
        "the reference variants and the equality check run in fp32 only",
    )
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    device = parse_device_args(ap, args)
    args.md_every = sorted({int(v) for v in args.md_every.split(",") if v})
    if any(k < 1 for k in args.md_every):
        ap.error("--md-every values must be >= 1")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine_info(device)
    print("machine:", json.dumps(info))
    spatial_opts = {"both": [False, True], "off": [False], "on": [True]}[args.spatial]
    t_start = time.perf_counter()
    results = {}
    for model_name in [m for m in args.models.split(",") if m]:
        model = timm.create_model(
            model_name, num_classes=NUM_CLASSES, **MODEL_KWARGS.get(model_name, {})
        )
        model.train().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(args.seed)
        b, s = args.batch_size, args.input_size
        x = torch.randn(b, 3, s, s, generator=gen).to(device)
        y = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device)
        fg, has = (t.to(device) for t in random_fg_masks(b, s, gen))
        layers = args.layers.split(",") if args.layers else PRESETS.get(model_name, ["last_conv"])
        rows = []
        for prec_name in args.amp:
            prec = Precision(prec_name, device)
            prec_rows = []
            for layer in layers:
                for spatial in spatial_opts:
                    t0 = time.perf_counter()
                    row = run_config(model, opt, x, y, fg, has, layer, spatial, args, prec)
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    prec_rows.append(row)
                    print(
                        f"  {model_name} {prec_name} {layer} spatial={spatial}: ours "
                        f"{fmt_ratio(row['time']['ours'])} ({row['wall_s']} s)",
                        flush=True,
                    )
            print_table(model_name, b, prec_rows, prec_name)
            if args.md_every:
                print_every_table(model_name, b, prec_rows, args.md_every, prec_name)
            rows += prec_rows
        results[model_name] = rows
    print(
        "\nratios: median over rounds of (variant time / plain time in the same round), "
        "(min-max) over rounds; mem: peak bytes through the allocator during one step / "
        "plain step; loss rel / grad rel: ours vs the naive official reference after "
        "alpha/B mapping (MD-loss parameter gradients, max over tensors of max|diff|/max|ref|)"
    )
    goal = None
    for row in results.get("resnet32_cifar", []):
        if row["layer"] == "layer3.4.conv2" and not row["spatial"] and row["precision"] == "fp32":
            goal = {"ratio": row["time"]["ours"]["ratio"], "target": 1.15}
            goal["met"] = goal["ratio"] <= goal["target"]
            print(
                f"goal (resnet32_cifar last conv, batch {args.batch_size}, channel term): "
                f"{goal['ratio']:.2f}x vs <= 1.15x: {'MET' if goal['met'] else 'MISSED'}"
            )
    summary = {
        "bench": "treatment",
        "machine": info,
        "args": {k: v for k, v in vars(args).items()},
        "wall_s": round(time.perf_counter() - t_start, 1),
        "goal_last_conv_resnet32": goal,
        "results": results,
    }
    print("RESULT " + json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
