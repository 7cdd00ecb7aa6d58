#!/usr/bin/env python3
"""Markdown tables for the Model Doctor vs alpha=0-control experiments.

    python experiments/summarize.py [RUNS_ROOT]      # default: experiments/runs

Reads, for every experiment folder under RUNS_ROOT (``cifar10``, ``cifar10_lt``), the runs written
by ``experiments/cifar10.sh`` / ``experiments/cifar10_lt.sh``: ``baseline/`` and the fine-tuning
runs ``<arm>_a<alpha>_s<seed>/``. Each run's args.yaml gives its alpha and seed; summary.csv and
per_class_acc.csv give its metrics. Only the FINAL epoch of each run is used (no epoch is ever
selected on the test set); a run that did not reach its last epoch is listed as incomplete and
left out of the means. The diagnosis statistics come from the first treatment run's
diagnosis.safetensors (every run uses that file).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
import sys
from pathlib import Path

import yaml

from md_plugin.doctor import Diagnosis

EXPERIMENTS = {
    "cifar10": "CIFAR-10 (resnet20_cifar, CE)",
    "cifar10_lt": "CIFAR-10-LT, imbalance ratio 100 (resnet20_cifar, Balanced Softmax)",
}
# keys that may legitimately differ between a treatment run and a control run
ARM_KEYS = {"md_alpha", "md_diagnosis", "experiment", "seed"}
EPOCH_RE = re.compile(r"Epoch (\d+)/(\d+) \|.*\| ([\d.]+) img/s")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fnum(v: str | float | None) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.args = yaml.safe_load((path / "args.yaml").read_text())
        self.summary = read_csv(path / "summary.csv") if (path / "summary.csv").exists() else []
        pc = path / "per_class_acc.csv"
        self.per_class_rows = read_csv(pc) if pc.exists() else []
        self.epochs = int(self.args["epochs"])
        self.alpha = float(self.args.get("md_alpha") or 0.0) if self.args.get("md") else None
        self.seed = int(self.args["seed"])
        self.log = path.parent / f"{path.name}.log"

    @property
    def complete(self) -> bool:
        last = self.final
        return last is not None and int(last["epoch"]) == self.epochs - 1

    @property
    def final(self) -> dict[str, str] | None:
        return max(self.summary, key=lambda r: int(r["epoch"])) if self.summary else None

    def metric(self, key: str) -> float:
        return fnum(self.final.get(key)) if self.final else math.nan

    @property
    def per_class(self) -> dict[str, float]:
        if not self.per_class_rows:
            return {}
        row = max(self.per_class_rows, key=lambda r: int(r["epoch"]))
        return {k: fnum(v) for k, v in row.items() if k != "epoch"}

    def throughput(self) -> float:
        """Mean training img/s over the run's epochs, from its log (NaN without a log)."""
        if not self.log.exists():
            return math.nan
        vals = [float(m.group(3)) for m in EPOCH_RE.finditer(self.log.read_text())]
        return statistics.fmean(vals) if vals else math.nan

    def before_top1(self) -> float:
        if not self.log.exists():
            return math.nan
        m = re.search(r"before treatment: top1 ([\d.]+)", self.log.read_text())
        return float(m.group(1)) if m else math.nan


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
def mean_std(vals: list[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def fmt(v: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def arm_label(alpha: float) -> str:
    return "control (alpha=0)" if alpha == 0 else f"Model Doctor (alpha={alpha:g})"


# ----------------------------------------------------------------------------------------------
# one experiment
# ----------------------------------------------------------------------------------------------
def summarize(root: Path, key: str) -> str:
    title = EXPERIMENTS.get(key, key)
    lines = [f"## {title}", ""]
    runs = [Run(p) for p in sorted(root.iterdir()) if (p / "args.yaml").exists()]
    base = next((r for r in runs if r.name == "baseline" and r.complete), None)
    fts = [r for r in runs if r.alpha is not None]
    incomplete = [r.name for r in runs if not r.complete]
    if incomplete:
        lines += [f"Incomplete runs (left out): {', '.join(incomplete)}", ""]
    fts = [r for r in fts if r.complete]
    arms: dict[float, list[Run]] = {}
    for r in sorted(fts, key=lambda r: (r.alpha, r.seed)):
        arms.setdefault(r.alpha, []).append(r)
    alphas = sorted(arms)
    lt = any("eval_many" in (r.final or {}) for r in runs if r.complete)

    # -- fairness check: treatment and control differ only by alpha (and seed across seeds) ----
    if len(alphas) >= 2:
        ref = arms[alphas[0]][0].args
        diffs = set()
        for r in fts:
            diffs |= {k for k in set(ref) | set(r.args) if ref.get(k) != r.args.get(k)}
        extra = sorted(diffs - ARM_KEYS)
        lines += [
            "Arguments that differ between fine-tuning runs: "
            + ", ".join(sorted(diffs))
            + (f" (**unexpected: {', '.join(extra)}**)" if extra else " (as designed)"),
            "",
        ]

    # -- headline ----------------------------------------------------------------------------
    hdr = ["run", "seeds", "final-epoch top-1 per seed", "top-1 mean ± std", "top-5 mean ± std"]
    hdr += ["train md_channel (last epoch)", "train img/s"]
    rows = []
    if base is not None:
        rows.append(
            [
                f"baseline ({base.epochs} ep from scratch)",
                str(base.seed),
                fmt(base.metric("eval_top1")),
                fmt(base.metric("eval_top1")),
                fmt(base.metric("eval_top5")),
                "-",
                fmt(base.throughput(), 0),
            ]
        )
    for a in alphas:
        rs = arms[a]
        rows.append(
            [
                f"{arm_label(a)}, +{rs[0].epochs} ep",
                ",".join(str(r.seed) for r in rs),
                " / ".join(fmt(r.metric("eval_top1")) for r in rs),
                mean_std([r.metric("eval_top1") for r in rs]),
                mean_std([r.metric("eval_top5") for r in rs]),
                mean_std([r.metric("train_md_channel") for r in rs]),
                fmt(statistics.fmean(r.throughput() for r in rs), 0),
            ]
        )
    lines += ["### Final-epoch test top-1 (%)", "", table(hdr, rows), ""]

    # -- paired difference (same seed, same start, same data order) ---------------------------
    if 0.0 in arms and len(alphas) >= 2:
        ctl = {r.seed: r for r in arms[0.0]}
        for a in alphas:
            if a == 0.0:
                continue
            pairs = [(r, ctl[r.seed]) for r in arms[a] if r.seed in ctl]
            d = [t.metric("eval_top1") - c.metric("eval_top1") for t, c in pairs]
            if not d:
                continue
            wins = sum(x > 0 for x in d)
            lines += [
                f"Paired difference Model Doctor (alpha={a:g}) − control, final-epoch top-1, per "
                f"seed: {', '.join(f'{x:+.2f}' for x in d)}; mean {mean_std(d)} points; "
                f"treatment better in {wins}/{len(d)} seeds.",
                "",
            ]

    # -- long-tailed groups --------------------------------------------------------------------
    if lt:
        counts = _counts(base or (fts[0] if fts else None))
        lines += [
            "### Many / medium / few-shot accuracy (%) at the final epoch",
            "",
            "Groups by training images per class (many > 100, medium 20-100, few < 20): "
            + _groups_text(counts)
            + ". Also shown: the common CIFAR-10-LT split by class index, head = classes 0-2, "
            "mid = 3-6, tail = 7-9.",
            "",
        ]
        hdr = ["run", "many", "medium", "few", "head (0-2)", "mid (3-6)", "tail (7-9)"]
        rows = []
        groups = {"head": range(0, 3), "mid": range(3, 7), "tail": range(7, 10)}

        def idx_groups(r: Run) -> dict[str, float]:
            vals = list(r.per_class.values())
            return {g: statistics.fmean(vals[i] for i in ix) for g, ix in groups.items()}

        if base is not None:
            ig = idx_groups(base)
            rows.append(
                ["baseline"]
                + [fmt(base.metric(f"eval_{g}")) for g in ("many", "medium", "few")]
                + [fmt(ig[g]) for g in groups]
            )
        for a in alphas:
            rs = arms[a]
            igs = [idx_groups(r) for r in rs]
            rows.append(
                [arm_label(a)]
                + [mean_std([r.metric(f"eval_{g}") for r in rs]) for g in ("many", "medium", "few")]
                + [mean_std([ig[g] for ig in igs]) for g in groups]
            )
        lines += [table(hdr, rows), ""]

    # -- per-class accuracy ----------------------------------------------------------------------
    classes = list(base.per_class) if base is not None else list(fts[0].per_class) if fts else []
    if classes:
        counts = _counts(base or fts[0])
        hdr = ["class", "train images", "baseline"] + [f"{arm_label(a)} (mean)" for a in alphas]
        if 0.0 in arms and len(alphas) == 2:
            hdr.append("MD − control")
        rows = []
        for i, c in enumerate(classes):
            row = [c, str(counts[i]) if counts else "?"]
            row.append(fmt(base.per_class.get(c, math.nan)) if base is not None else "n/a")
            means = {a: statistics.fmean(r.per_class[c] for r in arms[a]) for a in alphas}
            row += [fmt(means[a]) for a in alphas]
            if 0.0 in arms and len(alphas) == 2:
                other = [a for a in alphas if a != 0.0][0]
                row.append(f"{means[other] - means[0.0]:+.2f}")
            rows.append(row)
        lines += ["### Per-class test accuracy (%) at the final epoch", "", table(hdr, rows), ""]

    # -- diagnosis -------------------------------------------------------------------------------
    diag_run = next(
        (
            r
            for r in sorted(fts, key=lambda r: r.seed)
            if (r.path / "diagnosis.safetensors").exists()
        ),
        None,
    )
    if diag_run is not None:
        diag = Diagnosis.load(diag_run.path / "diagnosis.safetensors")
        names = classes or [str(i) for i in range(diag.num_classes)]
        hdr = ["class", "images used"] + [
            f"relevant channels, {n} (of {ld.channels})" for n, ld in diag.layers.items()
        ]
        rows = []
        for i in range(diag.num_classes):
            rows.append(
                [names[i], str(int(diag.counts[i]))]
                + [str(int(ld.masks[i].sum())) for ld in diag.layers.values()]
            )
        opts = ", ".join(f"{k}={v}" for k, v in sorted(diag.options.items()))
        lines += [
            f"### Diagnosis ({diag_run.name}/diagnosis.safetensors, used by every fine-tuning run)",
            "",
            f"Options: {opts or 'n/a'}.",
            "",
            table(hdr, rows),
            "",
        ]
    return "\n".join(lines)


def _counts(run: Run | None) -> list[int]:
    if run is None:
        return []
    p = run.path / "train_counts.json"
    if not p.exists():
        return []
    import json

    return list(json.loads(p.read_text())["counts"])


def _groups_text(counts: list[int]) -> str:
    many = [i for i, n in enumerate(counts) if n > 100]
    few = [i for i, n in enumerate(counts) if n < 20]
    med = [i for i, n in enumerate(counts) if 20 <= n <= 100]
    return "; ".join(
        f"{g}: classes {', '.join(map(str, ix)) if ix else 'none (n/a)'}"
        for g, ix in (("many", many), ("medium", med), ("few", few))
    )


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path("experiments/runs")
    found = False
    for key in EXPERIMENTS:
        d = root / key
        if d.is_dir() and any((p / "args.yaml").exists() for p in d.iterdir()):
            print(summarize(d, key))
            found = True
    if not found:
        print(f"no runs under {root}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
