#!/usr/bin/env python3
"""Copy one start point's raw result files from a runs folder into the committed layout.

    python experiments/collect_results.py --runs experiments/runs/round2_cifar10_lt \
        --out experiments/results/round2/cifar10_lt
    python experiments/collect_results.py --runs experiments/runs/round2_cifar10 \
        --baseline CHECKPOINT_FOLDER --out experiments/results/round2/cifar10

``experiments/runs/`` is git-ignored (checkpoints), so the small text files every report table
is built from are copied to ``--out``, one folder per run, checkpoints left out:

    <out>/baseline/   the start checkpoint's run: summary.csv, per_class_acc.csv, args.yaml,
                      train_counts.json, test_results.json and held_out.json if it has them,
                      train.log (its <name>.log, or the folder's train.log)
    <out>/start/      alpha.json, diagnosis.safetensors (a few KB), heldout.json
                      (start.heldout.json), prepare.log
    <out>/<run>/      every finished run (<run>/DONE and <run>.heldout.json): summary.csv,
                      per_class_acc.csv, test_results.json if any, args.yaml, heldout.json
                      (<run>.heldout.json), load.txt (<run>.load), train.log (<run>.log)
    <out>/chosen_alpha.json   round three's choice record, if the runs folder has one

``experiments/summarize_round2.py --results <out>`` builds the report's tables from these files
alone. Copying again overwrites; a run that is not finished is skipped (and named).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

RUN_FILES = ("summary.csv", "per_class_acc.csv", "test_results.json", "args.yaml")
BASELINE_FILES = RUN_FILES + ("train_counts.json", "held_out.json")
RUN_NAME = re.compile(r"\w+?_s\d+")


def _copy(src: Path, dst: Path, required: bool = True) -> bool:
    if not src.is_file():
        if required:
            raise SystemExit(f"error: {src} is missing")
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return True


def collect(runs: Path, out: Path, baseline: Path | None = None) -> list[str]:
    """Copy ``runs`` into ``out``; returns the names of the runs copied."""
    if not runs.is_dir():
        raise SystemExit(f"error: runs folder {runs} does not exist")
    baseline = baseline or runs / "baseline"
    for name in BASELINE_FILES:
        _copy(baseline / name, out / "baseline" / name, required=name == "summary.csv")
    log = runs / "baseline.log" if (runs / "baseline.log").is_file() else baseline / "train.log"
    _copy(log, out / "baseline" / "train.log", required=False)
    start = runs / "start"
    _copy(start / "alpha.json", out / "start" / "alpha.json")
    _copy(start / "diagnosis.safetensors", out / "start" / "diagnosis.safetensors")
    _copy(runs / "start.heldout.json", out / "start" / "heldout.json")
    _copy(runs / "prepare.log", out / "start" / "prepare.log", required=False)
    _copy(runs / "chosen_alpha.json", out / "chosen_alpha.json", required=False)
    copied, skipped = [], []
    for d in sorted(p for p in runs.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)):
        held = runs / f"{d.name}.heldout.json"
        if not ((d / "DONE").is_file() and held.is_file()):
            skipped.append(d.name)
            continue
        for name in RUN_FILES:
            _copy(d / name, out / d.name / name, required=name in ("summary.csv", "args.yaml"))
        _copy(held, out / d.name / "heldout.json")
        _copy(runs / f"{d.name}.load", out / d.name / "load.txt", required=False)
        _copy(runs / f"{d.name}.log", out / d.name / "train.log", required=False)
        copied.append(d.name)
    if skipped:
        print(f"not finished, not copied: {' '.join(skipped)}", file=sys.stderr)
    return copied


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="a round-two runs folder")
    p.add_argument(
        "--out", type=Path, required=True, help="experiments/results/round2/<start point>"
    )
    p.add_argument("--baseline", type=Path, default=None,
                   help="the start checkpoint's run folder (default: <runs>/baseline)")  # fmt: skip
    a = p.parse_args()
    copied = collect(a.runs, a.out, a.baseline)
    print(f"copied {len(copied)} runs to {a.out}: {' '.join(copied)}")


if __name__ == "__main__":
    main()
