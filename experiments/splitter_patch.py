"""CNNSplitter experiment, stage 2: split the strong model, patch each weak model, baselines.

Reads the runs of ``experiments/splitter_train.sh`` (``--models``) and writes, under ``--out``:

- ``modules_s{seed}.safetensors``: the GA split of the strong model (classes 0-4) per search seed,
  on the strong run's held-out training images (never the test set), at a reduced budget;
- ``modules_diag.safetensors``: the Model Doctor baseline (relevant channels of the last conv per
  class, from a diagnosis on the strong run's *training* images; ranges on the held-out images);
- ``results.json`` and ``summary.md``: per TC and variant (GA module per seed, whole strong model,
  diagnosis module) the weak model's TC precision / recall / F1 and non-TC accuracy before and
  after patching on CIFAR-10's test split of the weak task, module size and FLOPs, composed
  accuracy vs the strong model, and the wall time of every stage with the machine load.

Each finished stage is kept (its file exists) and skipped when the script is run again.

    OMP_NUM_THREADS=1 python experiments/splitter_patch.py --models /work/runs/i10-patch/models \\
        --out /work/runs/i10-patch/patch --tcs 0 2 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

import md_plugin  # noqa: F401
from md_plugin.data.class_map import apply_class_cap, apply_class_map
from md_plugin.data.datasets import TransformedDataset, create_dataset, create_datasets
from md_plugin.data.transforms import create_eval_transform
from md_plugin.splitter import PatchedModel, evaluate_patch, own_class_range
from md_plugin.train.checkpoint import load_weights

PAPER = {"tc_precision": 12.54, "tc_recall": 2.14, "non_tc_acc": 1.18, "composed_loss": 2.89}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(run: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    import timm

    a = yaml.safe_load((run / "args.yaml").read_text())
    counts = json.loads((run / "train_counts.json").read_text())["counts"]
    m = timm.create_model(a["model"], num_classes=len(counts))
    load_weights(m, run / "model_best.pth.tar")
    return m.eval(), a


def weak_task(run: Path) -> tuple[torch.nn.Module, Any]:
    """A weak run's model and its task's test split (the weak class map applied)."""
    weak, wa = _load(run)
    ds = apply_class_map(
        create_dataset(wa["dataset"], wa["data_dir"], wa.get("val_split", "validation")),
        wa["class_map"],
        wa["data_dir"],
    )
    return weak, ds


def _splits(a: dict[str, Any]):
    return create_datasets(
        a["dataset"], a["data_dir"], a.get("train_split", "train"),
        a.get("val_split", "validation"), class_map=a.get("class_map") or None,
        class_cap=a.get("class_cap"), val_from_train=a.get("val_from_train"),
        data_seed=a.get("data_seed", 0),
    )  # fmt: skip


def _loader(ds, tf, bs=250) -> DataLoader:
    return DataLoader(TransformedDataset(ds, tf), batch_size=bs, shuffle=False, num_workers=0)


class _CpuAcc:
    """The two accelerate methods ``evaluate`` needs, for one CPU process."""

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def gather_for_metrics(x):
        return x


class Stage:
    """Times a stage and records the load average around it."""

    def __init__(self, name: str, times: dict[str, Any]):
        self.name, self.times = name, times
        self.path = times["_dir"] / f"{name}.json"  # one file per stage: parallel runs are safe

    def __enter__(self):
        self.t0, self.l0 = time.perf_counter(), os.getloadavg()[0]
        _log(f"start {self.name} (load {self.l0:.1f})")
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        rec = {
            "wall_s": round(dt, 1),
            "load_start": round(self.l0, 1),
            "load_end": round(os.getloadavg()[0], 1),
        }
        self.path.write_text(json.dumps(rec))
        _log(f"end {self.name}: {dt:.0f} s")


def split_stage(args, strong, val_loader, seed: int, out: Path, times) -> Path:
    from md_plugin.splitter import modularize

    path = out / f"modules_s{seed}.safetensors"
    if path.is_file():
        return path
    with Stage(f"split_s{seed}", times):
        mods = modularize(
            strong, val_loader, classes=list(range(5)), generations=args.generations,
            population=args.population, val_images=args.val_images, seed=seed,
            min_confidence=args.min_confidence,
            state_path=str(out / f"search_s{seed}.state"), log=_log,
        )  # fmt: skip
        mods.save(path)
    return path


def diag_stage(args, strong, train_ds, val_loader, tf, out: Path, times) -> Path:
    from md_plugin.doctor import diagnose
    from md_plugin.splitter import modules_from_diagnosis

    path = out / "modules_diag.safetensors"
    if path.is_file():
        return path
    with Stage("diagnosis", times):
        # the 50 most confident of a seeded 300 training images per class (a CPU budget)
        sub = apply_class_cap(train_ds, {c: 300 for c in range(5)}, seed=0)
        diag = diagnose(
            strong, _loader(sub, tf, 200), "last_conv", 5, per_class=args.diag_per_class,
            input_size=(3, 32, 32),
        )  # fmt: skip
        diag.save(out / "diagnosis.safetensors")
        mods = modules_from_diagnosis(strong, diag, classes=list(range(5)), input_size=(3, 32, 32))
        mods.measure(val_loader)
        mods.save(path)
    return path


def patch_stage(args, tc, strong, strong_val_loader, tf, out: Path, times) -> dict[str, Any]:
    from md_plugin.splitter import SplitModules

    res_path = out / f"patch_tc{tc}.json"
    if res_path.is_file():
        return json.loads(res_path.read_text())
    weak_run = args.models / f"weak_tc{tc}"
    weak, ds = weak_task(weak_run)
    weak_tc = 5  # the weak task appends the TC last
    if args.test_per_class:  # a seeded subset of every class (fixed before any result)
        ds = apply_class_cap(ds, {c: args.test_per_class for c in range(6)}, seed=0)
    loader = _loader(ds, tf)
    rows: dict[str, Any] = {}
    with Stage(f"patch_tc{tc}", times):
        variants: list[tuple[str, torch.nn.Module, tuple[float, float], dict]] = []
        for s in args.seeds:
            mods = SplitModules.load(out / f"modules_s{s}.safetensors", strong, (3, 32, 32))
            st = next(m for m in mods.stats["modules"] if m["cls"] == tc)
            variants.append((f"ga_s{s}", mods.module(tc, extract=True), mods.range(tc), st))
        dm = SplitModules.load(out / "modules_diag.safetensors", strong, (3, 32, 32))
        st = next(m for m in dm.stats["modules"] if m["cls"] == tc)
        variants.append(("diagnosis", dm.module(tc, extract=True), dm.range(tc), st))
        lo_hi = own_class_range(strong, strong_val_loader, tc)
        variants.append(
            (
                "whole_strong",
                strong,
                lo_hi,
                {"kernels_pct": 100.0, "flops_pct": 100.0, "params_pct": 100.0},
            )  # fmt: skip
        )
        for name, module, rng, st in variants:
            # one file per variant, so a run with more seeds re-uses the variants already done
            var_path = out / f"patch_tc{tc}_{name}.json"
            if var_path.is_file():
                rows[name] = json.loads(var_path.read_text())
                continue
            t0 = time.perf_counter()
            r = evaluate_patch(PatchedModel(weak, module, weak_tc, tc, rng), loader)
            rows[name] = {**r, "range": list(rng), "module": st,
                          "eval_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            var_path.write_text(json.dumps(rows[name], indent=1))
            b, a = r["before"], r["after"]
            _log(
                f"TC {tc} {name}: P {b['tc_precision']:.2f}->{a['tc_precision']:.2f} "
                f"R {b['tc_recall']:.2f}->{a['tc_recall']:.2f} F1 {b['tc_f1']:.2f}->{a['tc_f1']:.2f} "
                f"nonTC {b['non_tc_acc']:.2f}->{a['non_tc_acc']:.2f}"
            )
    out_d = {"tc": tc, "weak_run": str(weak_run), "test_images": len(ds), "variants": rows}
    res_path.write_text(json.dumps(out_d, indent=1))
    return out_d


def _mean_sd(v: list[float]) -> str:
    t = torch.tensor(v, dtype=torch.float64)
    return f"{t.mean():+.2f} ± {t.std(unbiased=True):.2f}" if len(v) > 1 else f"{t.mean():+.2f}"


def summarize(args, patch: list[dict], split_stats: dict, times: dict, strong_test: dict) -> str:
    keys = [("tc_precision", "P"), ("tc_recall", "R"), ("tc_f1", "F1"), ("non_tc_acc", "non-TC")]
    lines = ["| TC | variant | module kernels / FLOPs (%) | " + " | ".join(
        f"{lab} before → after" for _, lab in keys) + " |",
        "|---|---|---|" + "---|" * len(keys)]  # fmt: skip
    deltas: dict[str, dict[str, list[float]]] = {}
    for p in patch:
        for name, r in p["variants"].items():
            st = r["module"]
            cells = [f"{r['before'][k]:.2f} → {r['after'][k]:.2f}" for k, _ in keys]
            lines.append(
                f"| {p['tc']} | {name} | {st.get('kernels_pct', float('nan')):.1f} / "
                f"{st.get('flops_pct', float('nan')):.1f} | " + " | ".join(cells) + " |"
            )
            group = "ga" if name.startswith("ga_") else name
            for k, _ in keys:
                deltas.setdefault(group, {}).setdefault(k, []).append(
                    r["after"][k] - r["before"][k]
                )
    lines += ["", "Mean change in points (± sample SD over TCs × seeds):", "",
              "| variant | n | " + " | ".join(lab for _, lab in keys) + " |",
              "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for g, d in deltas.items():
        lines.append(
            f"| {g} | {len(d['tc_f1'])} | " + " | ".join(_mean_sd(d[k]) for k, _ in keys) + " |"
        )
    lines.append(
        f"| paper (averages) | | +{PAPER['tc_precision']} | +{PAPER['tc_recall']} | | "
        f"+{PAPER['non_tc_acc']} |"
    )
    lines += ["", "Splits (held-out validation images of the strong model):", "",
              "| split | composed acc | strong acc | loss | mean kernels / FLOPs (%) | best gen (1-based) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, s in split_stats.items():
        mk = sum(m["kernels_pct"] for m in s["modules"]) / len(s["modules"])
        mf = sum(m["flops_pct"] for m in s["modules"]) / len(s["modules"])
        lines.append(
            f"| {name} | {s['composed_acc']:.2f} | {s['strong_acc']:.2f} | "
            f"{(s['strong_acc'] - s['composed_acc']) / 100:.4f} | {mk:.1f} / {mf:.1f} | "
            f"{'-' if s.get('best_generation') is None else s['best_generation'] + 1} |"
        )
    lines += ["", f"Strong model test top-1 (classes 0-4, read once): {strong_test.get('top1')}",
              "", "Wall time per stage (s, with 1-min load average at start/end):", ""]  # fmt: skip
    for k, v in times.items():
        lines.append(f"- {k}: {v['wall_s']} s (load {v['load_start']} → {v['load_end']})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tcs", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--val-images", type=int, default=250)
    ap.add_argument("--diag-per-class", type=int, default=50)
    ap.add_argument("--min-confidence", type=float, default=0.9, help="importance image filter")
    ap.add_argument(
        "--val-per-class",
        type=int,
        default=0,
        help="use this many held-out images per class for the split (0: all 500)",
    )
    ap.add_argument(
        "--test-per-class",
        type=int,
        default=0,
        help="evaluate the patch on this many test images per weak class (0: all 1,000)",
    )
    ap.add_argument("--stages", nargs="+", default=["split", "diag", "patch", "summary"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "times").mkdir(exist_ok=True)
    times: dict[str, Any] = {"_dir": args.out / "times"}
    strong, sa = _load(args.models / "strong_r20_c04")
    from timm.data import resolve_data_config

    tf = create_eval_transform(resolve_data_config({}, model=strong))
    s = _splits(sa)
    held = s.val
    if args.val_per_class:  # a seeded subset of the held-out images (a CPU budget)
        held = apply_class_cap(held, {c: args.val_per_class for c in range(5)}, seed=0)
    val_loader = _loader(held, tf)
    if "split" in args.stages:
        for seed in args.seeds:
            split_stage(args, strong, val_loader, seed, args.out, times)
    if "diag" in args.stages:
        diag_stage(args, strong, s.train, val_loader, tf, args.out, times)
    patch = []
    if "patch" in args.stages:
        for tc in args.tcs:
            patch.append(patch_stage(args, tc, strong, val_loader, tf, args.out, times))
    if "summary" not in args.stages:
        return
    from md_plugin.splitter import SplitModules

    times = {f.stem: json.loads(f.read_text()) for f in sorted((args.out / "times").glob("*.json"))}
    patch = [
        json.loads((args.out / f"patch_tc{tc}.json").read_text())
        for tc in args.tcs
        if (args.out / f"patch_tc{tc}.json").is_file()
    ]
    split_stats = {}
    for name in [f"modules_s{x}" for x in args.seeds] + ["modules_diag"]:
        f = args.out / f"{name}.safetensors"
        if f.is_file():
            m = SplitModules.load(f)
            split_stats[name] = {**m.stats, "best_generation": m.options.get("best_generation"),
                                 "timings": m.options.get("timings")}  # fmt: skip
    tr = args.models / "strong_r20_c04" / "test_results.json"
    if not tr.is_file():  # the run did not reach its final test: read the test split once here
        from md_plugin.train.engine import evaluate

        with Stage("strong_test", times):
            m = evaluate(strong, _loader(s.test, tf), _CpuAcc(), 5)
        tr.write_text(json.dumps({"checkpoint": "model_best", "top1": m["top1"],
                                  "per_class": m["per_class"], "images": m["count"],
                                  "source": "experiments/splitter_patch.py"}))  # fmt: skip
    strong_test = json.loads(tr.read_text())
    env = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "budget": dict(
            generations=args.generations, population=args.population, val_images=args.val_images
        ),  # fmt: skip
    }
    res = {"env": env, "times": times, "splits": split_stats, "patch": patch,
           "strong_test": strong_test}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    md = summarize(args, patch, split_stats, times, strong_test)
    (args.out / "summary.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
