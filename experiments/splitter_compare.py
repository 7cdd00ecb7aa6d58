"""CNNSplitter experiment, round two: every split's composed test accuracy, and the patches.

Reads the split runs of ``experiments/splitter_round2.sh`` (``--splits``: one folder per
``md-doctor split`` run, named ``{strong}_{method}_s{seed}``) and the weak runs of
``experiments/splitter_train.sh`` (``--models``: ``weak_tc{tc}``), and writes raw files under
``--out``:

- ``composed/{run}.json``: the composed accuracy of the run's modules on CIFAR-10's test split
  of classes 0-4 (read here, after every choice was made on held-out training images), the strong
  model's accuracy on the same images, the modules' kernels and FLOPs, the stage times; a
  calibrated split is also measured with its calibration removed (``..._nocal``: the same masks
  as ``--calibrate none``, since the search does not depend on the calibration);
- ``patch/{strong}_tc{tc}_{variant}.json``: the weak model's TC precision / recall / F1 and
  non-TC accuracy before and after patching on the weak task's test split, for every calibrated
  split of that strong model, the whole strong model and the Model Doctor diagnosis module;
- ``modules_diag_{strong}.safetensors``: the diagnosis baseline (``splitter_patch.diag_stage``).

``experiments/summarize_splitter.py`` turns them into the tables and the figure. Each file is
kept and skipped on a rerun.

    OMP_NUM_THREADS=1 python experiments/splitter_compare.py --splits runs/splits \\
        --models runs/models --out experiments/results/splitter/round2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import timm
import torch
import yaml
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from splitter_patch import _loader, _splits, diag_stage, weak_task  # noqa: E402

import md_plugin  # noqa: E402,F401
from md_plugin.checkpoint import load_weights  # noqa: E402
from md_plugin.data.transforms import create_eval_transform  # noqa: E402
from md_plugin.splitter import (  # noqa: E402
    PatchedModel,
    SplitModules,
    evaluate_patch,
    own_class_range,
)

RUN = re.compile(r"^(?P<strong>[a-z0-9]+)_(?P<method>.+)_s(?P<seed>\d+)$")
WEAK_TC = 5  # the weak task appends the TC last


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _strong_model(split_run: Path) -> torch.nn.Module:
    a = yaml.safe_load((split_run / "args.yaml").read_text())
    m = timm.create_model(a["model"], num_classes=5, **(a.get("model_kwargs") or {}))
    load_weights(m, a["checkpoint"])
    return m.eval()


@torch.no_grad()
def composed_accuracy(mods: SplitModules, strong: torch.nn.Module, loader: DataLoader) -> dict:
    """Composed and strong top-1 (%) on ``loader``'s images of the modules' classes."""
    hit = strong_hit = n = 0
    cls = torch.tensor(mods.classes)
    for x, y in loader:
        y = torch.as_tensor(y)
        keep = (y[:, None] == cls[None]).any(1)
        x, y = x[keep], y[keep]
        hit += int((mods.predict(x) == y).sum())
        strong_hit += int((cls[strong(x)[:, cls].argmax(1)] == y).sum())
        n += len(y)
    return {"composed_acc": 100 * hit / n, "strong_acc": 100 * strong_hit / n, "images": n}


def composed_stage(run: Path, strong, test_loader: DataLoader, out: Path) -> None:
    mods = SplitModules.load(run / "modules.safetensors", strong)
    mk = [m["kernels_pct"] for m in mods.stats["modules"]]
    mf = [m["flops_pct"] for m in mods.stats["modules"]]
    base = {
        "run": run.name,
        **RUN.match(run.name).groupdict(),
        "kernels_pct": sum(mk) / len(mk),
        "flops_pct": sum(mf) / len(mf),
        "heldout": {k: mods.stats[k] for k in ("composed_acc", "strong_acc")},
        "timings": mods.options.get("timings"),
        "calibration": mods.options.get("calibration", {}).get("mode", "none"),
        "source": mods.options.get("source"),
    }
    path = out / f"{run.name}.json"
    if not path.is_file():
        t0 = time.perf_counter()
        rec = {**base, "test": composed_accuracy(mods, strong, test_loader)}
        rec["eval_s"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(rec, indent=1))
        _log(f"{run.name}: composed {rec['test']['composed_acc']:.2f}% vs strong "
             f"{rec['test']['strong_acc']:.2f}% at {base['kernels_pct']:.1f}% kernels")  # fmt: skip
    nocal = out / f"{run.name}_nocal.json"
    if mods.calibrated and mods.heads is None and not nocal.is_file():
        mods.set_calibration(None, None)
        rec = {**base, "run": run.name + "_nocal", "method": base["method"] + "_nocal",
               "calibration": "none (removed)", "test": composed_accuracy(mods, strong, test_loader)}  # fmt: skip
        nocal.write_text(json.dumps(rec, indent=1))
        _log(f"{run.name} uncalibrated: composed {rec['test']['composed_acc']:.2f}%")


def patch_stage(strong_key, strong, runs, held_loader, diag_path, tf, args) -> None:
    for tc in args.tcs:
        weak_run = args.models / f"weak_tc{tc}"
        weak, ds = weak_task(weak_run)
        loader = _loader(ds, tf)
        # a module with a head is patched twice: by its head's score (md-doctor patch
        # --module-score head) and by the paper's min-max-normalised own logit (rule "range",
        # the default)
        variants: list[tuple[str, Any, str]] = [(r.name, r / "modules.safetensors", "own")
                                                for r in runs]  # fmt: skip
        variants += [(r.name + "_range", r / "modules.safetensors", "range") for r in runs]
        variants += [("diagnosis", diag_path, "own"), ("whole_strong", None, "own")]
        for name, path, rule in variants:
            res = args.out / "patch" / f"{strong_key}_tc{tc}_{name}.json"
            if res.is_file():
                continue
            head = None
            if path is None:
                module, rng = strong, own_class_range(strong, held_loader, tc)
                st = {"kernels_pct": 100.0, "flops_pct": 100.0, "params_pct": 100.0}
            else:
                mods = SplitModules.load(path, strong, (3, 32, 32))
                if rule == "range" and mods.heads is None:
                    continue  # a GA module is patched by its range already
                module = mods.module(tc, extract=True)
                head = mods.module_head(tc) if rule == "own" else None
                rng = None if head is not None else mods.range(tc)
                st = next(m for m in mods.stats["modules"] if m["cls"] == tc)
            t0 = time.perf_counter()
            r = evaluate_patch(PatchedModel(weak, module, WEAK_TC, tc, rng, head=head), loader)
            rec = {"strong": strong_key, "tc": tc, "variant": name, "rule": rule, **r, "module": st,
                   "range": list(rng) if rng else None, "head": head is not None,
                   "weak_run": weak_run.name, "test_images": len(ds),
                   "eval_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            res.write_text(json.dumps(rec, indent=1))
            b, a = r["before"], r["after"]
            _log(f"{strong_key} TC {tc} {name}: F1 {b['tc_f1']:.2f}->{a['tc_f1']:.2f} "
                 f"P {b['tc_precision']:.2f}->{a['tc_precision']:.2f} "
                 f"R {b['tc_recall']:.2f}->{a['tc_recall']:.2f} "
                 f"nonTC {b['non_tc_acc']:.2f}->{a['non_tc_acc']:.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tcs", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--runs", nargs="*", default=None, help="only these split runs")
    ap.add_argument(
        "--patch-methods", nargs="+", default=["ga_affine", "grad_ones_affine", "grad_t60_affine"]
    )
    ap.add_argument("--diag-per-class", type=int, default=50)
    ap.add_argument("--stages", nargs="+", default=["composed", "patch"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for d in ("composed", "patch"):
        (args.out / d).mkdir(parents=True, exist_ok=True)
    runs = sorted(
        p.parent for p in args.splits.glob("*/modules.safetensors") if RUN.match(p.parent.name)
    )
    if args.runs:
        runs = [r for r in runs if r.name in args.runs]
    by_strong: dict[str, list[Path]] = {}
    for r in runs:
        by_strong.setdefault(RUN.match(r.name)["strong"], []).append(r)
    for key, rs in by_strong.items():
        strong = _strong_model(rs[0])
        a = yaml.safe_load((rs[0] / "args.yaml").read_text())
        from timm.data import resolve_data_config

        tf = create_eval_transform(resolve_data_config({}, model=strong))
        s = _splits(a)  # the strong run's held-out images: ranges, diagnosis measurement
        held_loader = _loader(s.val, tf)
        if "composed" in args.stages:
            test_loader = _loader(s.test, tf)
            for r in rs:
                composed_stage(r, strong, test_loader, args.out / "composed")
        if "patch" in args.stages:
            diag_args = SimpleNamespace(diag_per_class=args.diag_per_class)
            tmp = args.out / f"diag_{key}"
            tmp.mkdir(exist_ok=True)
            times: dict[str, Any] = {"_dir": tmp}
            diag = diag_stage(diag_args, strong, s.train, held_loader, tf, tmp, times)
            chosen = [r for r in rs if RUN.match(r.name)["method"] in args.patch_methods]
            patch_stage(key, strong, chosen, held_loader, diag, tf, args)


if __name__ == "__main__":
    main()
