"""Every table of round two and round three in docs/results.md, from the committed raw files.

    python experiments/summarize_round2.py --results experiments/results/round2/cifar10 \
        --figure docs/round2_penalty.png
    python experiments/summarize_round2.py --results experiments/results/round2/cifar10_lt \
        --figure docs/round2_penalty_lt.png
    python experiments/summarize_round2.py --results experiments/results/round2/cifar10_lt --round3

``--results`` is one start point's folder as ``experiments/collect_results.py`` lays it out
(``baseline/``, ``start/``, one folder per run ``<arm>_s<seed>``). A run trained with
``--val-from-train`` (start point B) has its single test evaluation in ``test_results.json``;
that is what is reported as "test" (its ``summary.csv`` holds the hold-out). A long-tailed start
point (unequal ``baseline/train_counts.json``) adds the many/medium/few-shot tables.

Every run is reported, grouped by arm (the name before ``_s<seed>``): final test top-1/top-5, the
paired difference to the control of the same seed with its paired t-test and 95% CI
(``experiments/stats.py``), per-class accuracy, the per-epoch penalty terms and the held-out
statistic (``<run>/heldout.json``). ``--round3`` reports round three instead: the alpha grid on
the hold-out, the choice record (``chosen_alpha.json``) and the chosen alpha against the control.
Nothing is selected here.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import Paired, bonferroni, fmt_ci, fmt_p, paired  # noqa: E402

ARMS = {
    "ctl": "control (alpha 0, monitored)",
    "official": "official (alpha 0.078)",
    "share": "share (scale-invariant)",
    "trueonly": "true-class only (alpha 0.078)",
}
PRIMARY = 6  # round two's primary comparisons: 3 arms x 2 start points, test top-1
PENALTY_KEYS = ("train_md_channel", "train_md_irr_mass", "train_md_irr_share")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ms(values: list[float], digits: int = 2, signed: bool = False) -> str:
    """Mean ± sample SD (one value: the value); ``signed`` for differences (+0.41 ± 0.16)."""
    if not values:
        return "-"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _final_test(run: Path, rows: list[dict]) -> tuple[dict, dict[str, float]]:
    """The run's one test evaluation: ``test_results.json`` if it has one, else its last row."""
    tr = run / "test_results.json"
    if tr.exists():
        t = json.loads(tr.read_text())
        return (
            {"eval_top1": t["top1"], "eval_top5": t["top5"]},
            {c: float(v) for c, v in zip(t["classes"], t["per_class"])},
        )
    pc = _rows(run / "per_class_acc.csv")[-1]
    return rows[-1], {k: float(v) for k, v in pc.items() if k != "epoch"}


@dataclass
class Run:
    name: str
    rows: list[dict]
    top1: float
    top5: float
    per_class: dict[str, float]
    heldout: dict
    load: str
    log: str


@dataclass
class StartPoint:
    """One start point's committed files: the start checkpoint, its diagnosis record, the runs."""

    root: Path
    start_top1: float
    start_top5: float
    start_pc: dict[str, float]
    counts: list[int] | None
    start_held: dict | None
    alpha: dict
    runs: dict[str, dict[int, Run]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.start_pc)

    @property
    def held_where(self) -> str:
        if self.start_held and self.start_held.get("split") == "val_from_train":
            return f"{self.start_held['images']:,} held-out training images"
        return "first 1,000 test images"


def load(root: Path) -> StartPoint:
    """Read ``root`` (the layout of ``collect_results.py``)."""
    base = root / "baseline"
    if not (base / "summary.csv").exists():
        raise SystemExit(f"error: {base}/summary.csv missing: is {root} a collected start point?")
    final, pc = _final_test(base, _rows(base / "summary.csv"))
    counts = base / "train_counts.json"
    held = root / "start" / "heldout.json"
    sp = StartPoint(
        root=root,
        start_top1=float(final["eval_top1"]),
        start_top5=float(final["eval_top5"]),
        start_pc=pc,
        counts=json.loads(counts.read_text())["counts"] if counts.exists() else None,
        start_held=json.loads(held.read_text()) if held.exists() else None,
        alpha=json.loads((root / "start" / "alpha.json").read_text()),
    )
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"(\w+?)_s(\d+)", d.name)
        if not (d.is_dir() and m):
            continue
        rows = _rows(d / "summary.csv")
        fin, pcs = _final_test(d, rows)
        load_f, log_f = d / "load.txt", d / "train.log"
        sp.runs.setdefault(m.group(1), {})[int(m.group(2))] = Run(
            name=d.name,
            rows=rows,
            top1=float(fin["eval_top1"]),
            top5=float(fin["eval_top5"]),
            per_class=pcs,
            heldout=json.loads((d / "heldout.json").read_text()),
            load=load_f.read_text().strip().replace("\n", "; ") if load_f.exists() else "",
            log=log_f.read_text() if log_f.exists() else "",
        )
    return sp


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _pair(sp: StartPoint, arm: str, value) -> tuple[list[int], Paired]:
    """Paired test of ``value(run)`` between ``arm`` and the control over their common seeds."""
    seeds = sorted(set(sp.runs[arm]) & set(sp.runs["ctl"]))
    a = [value(sp.runs[arm][s]) for s in seeds]
    b = [value(sp.runs["ctl"][s]) for s in seeds]
    return seeds, paired(a, b)


def _verdict(r: Paired) -> str:
    return "yes" if r.two_sd else ("no (worse)" if r.mean < 0 else "no")


def _seeds(sp: StartPoint, arm: str) -> list[int]:
    return sorted(sp.runs[arm])


def top1_table(sp: StartPoint, arms: dict[str, str]) -> str:
    rows = [["start checkpoint", "-", f"{sp.start_top1:.2f}", f"{sp.start_top1:.2f}",
             f"{sp.start_top5:.2f}"]]  # fmt: skip
    for arm, label in arms.items():
        runs = [sp.runs[arm][s] for s in _seeds(sp, arm)]
        t1, t5 = [r.top1 for r in runs], [r.top5 for r in runs]
        rows.append([label, ",".join(map(str, _seeds(sp, arm))),
                     " / ".join(f"{v:.2f}" for v in t1), ms(t1), ms(t5)])  # fmt: skip
    return _table(["arm", "seeds", "top-1 per seed", "top-1 mean ± SD", "top-5 mean ± SD"], rows)


def paired_table(sp: StartPoint, arms: dict[str, str]) -> str:
    rows, df = [], 2
    for arm, label in arms.items():
        if arm == "ctl":
            continue
        _, r = _pair(sp, arm, lambda run: run.top1)
        df = r.n - 1
        rows.append([
            label, " / ".join(f"{v:+.2f}" for v in r.diffs), ms(list(r.diffs), signed=True),
            f"{r.better}/{r.n}", f"{r.t:+.2f}", fmt_p(r.p), fmt_ci(r.ci), _verdict(r),
        ])  # fmt: skip
    head = ["arm", "per seed", "mean ± SD", "better in", f"t ({df} df)", "p (two-sided)", "95% CI",
            "mean > 2 SD (pre-registered)?"]  # fmt: skip
    return _table(head, rows)


def per_class_table(sp: StartPoint, arms: dict[str, str]) -> str:
    rows = []
    for c in sp.classes:
        cells = [c, f"{sp.start_pc[c]:.2f}"]
        for arm in arms:
            cells.append(f"{statistics.mean(r.per_class[c] for r in sp.runs[arm].values()):.2f}")
        rows.append(cells)
    return _table(["class", "start", *arms.values()], rows)


def per_class_paired_table(sp: StartPoint, arms: dict[str, str]) -> str:
    others = [a for a in arms if a != "ctl"]
    rows = []
    for c in sp.classes:
        cells = [c]
        for arm in others:
            _, r = _pair(sp, arm, lambda run, c=c: run.per_class[c])
            cells += [f"{r.mean:+.2f} {fmt_ci(r.ci)}", fmt_p(r.p)]
        rows.append(cells)
    head = ["class"]
    for arm in others:
        head += [f"{short(arm)} − control [95% CI]", "p"]
    return _table(head, rows)


def _shots(sp: StartPoint, pc: dict[str, float]) -> dict[str, float]:
    from md_plugin.metrics import shot_accuracy

    return shot_accuracy([pc[c] for c in sp.classes], sp.counts)


def _groups(sp: StartPoint) -> tuple[dict[str, list[int]], list[str]]:
    from md_plugin.metrics import SHOT_GROUPS, shot_groups

    groups = shot_groups(sp.counts)
    return groups, [g for g in SHOT_GROUPS if groups[g]]  # CIFAR-10-LT has no few-shot class


def shots_table(sp: StartPoint, arms: dict[str, str]) -> str:
    _, present = _groups(sp)
    st = _shots(sp, sp.start_pc)
    rows = [["start checkpoint", *(f"{st[g]:.2f}" for g in present)]]
    for arm, label in arms.items():
        per_seed = [_shots(sp, r.per_class) for r in sp.runs[arm].values()]
        rows.append([label, *(ms([v[g] for v in per_seed]) for g in present)])
    return _table(["arm", *present], rows)


def shots_paired_table(sp: StartPoint, arms: dict[str, str]) -> str:
    _, present = _groups(sp)
    rows = []
    for arm, label in arms.items():
        if arm == "ctl":
            continue
        for g in present:
            _, r = _pair(sp, arm, lambda run, g=g: _shots(sp, run.per_class)[g])
            rows.append([label, g, " / ".join(f"{v:+.2f}" for v in r.diffs), ms(list(r.diffs), signed=True),
                         fmt_p(r.p), fmt_ci(r.ci)])  # fmt: skip
    return _table(["arm", "group", "per seed", "mean ± SD", "p", "95% CI"], rows)


def penalty_table(sp: StartPoint, arms: dict[str, str], key: str) -> str:
    n_ep = max(len(r.rows) for arm in arms for r in sp.runs[arm].values())
    rows = []
    for arm, label in arms.items():
        cells = [label]
        for e in range(n_ep):
            v = [float(r.rows[e][key]) for r in sp.runs[arm].values() if e < len(r.rows)]
            cells.append(f"{statistics.mean(v):.4g}" if v else "-")
        rows.append(cells)
    return _table(["arm", *(f"ep {e + 1}" for e in range(n_ep))], rows)


def heldout_table(sp: StartPoint, arms: dict[str, str]) -> str:
    rows = []
    h = sp.start_held
    if h:
        rows.append(["start checkpoint", f"{h['irr_share']:.4f}", f"{h['irr_mass']:.3f}",
                     f"{h['rel_mass']:.3f}", f"{h['top1']:.1f}"])  # fmt: skip
    for arm, label in arms.items():
        hs = [sp.runs[arm][s].heldout for s in _seeds(sp, arm)]
        rows.append([label, ms([x["irr_share"] for x in hs], 4), ms([x["irr_mass"] for x in hs], 3),
                     ms([x["rel_mass"] for x in hs], 3), ms([x["top1"] for x in hs], 1)])  # fmt: skip
    head = ["arm", "irrelevant share", "irrelevant mass", "relevant mass", "top-1 on these images"]
    return _table(head, rows)


def heldout_paired_table(sp: StartPoint, arms: dict[str, str]) -> str:
    rows = []
    for arm, label in arms.items():
        if arm == "ctl":
            continue
        _, r = _pair(sp, arm, lambda run: run.heldout["irr_share"])
        ctl = statistics.mean(run.heldout["irr_share"] for run in sp.runs["ctl"].values())
        rows.append([label, " / ".join(f"{v:+.4f}" for v in r.diffs), ms(list(r.diffs), 4, signed=True),
                     f"{100 * r.mean / ctl:+.0f}%", f"{r.n - r.better}/{r.n}", fmt_p(r.p),
                     fmt_ci(r.ci, 4)])  # fmt: skip
    head = ["arm", "per seed", "mean ± SD", "relative to control", "lower in", "p", "95% CI"]
    return _table(head, rows)


def walltime_table(sp: StartPoint, arms: dict[str, str]) -> str:
    rows = []
    for arm in arms:
        for s in _seeds(sp, arm):
            r = sp.runs[arm][s]
            ips = [int(v) for v in re.findall(r"\| (\d+) img/s", r.log)]
            rows.append([r.name, f"{min(ips)}-{max(ips)}" if ips else "-", r.load])
    head = ["run", "train img/s per epoch (min-max)", "wall time and 1/5/15-min load (`load.txt`)"]
    return _table(head, rows)


def round2_tables(sp: StartPoint) -> dict[str, str]:
    """Round two's tables of one start point, in the order of docs/results.md."""
    arms = {a: label for a, label in ARMS.items() if a in sp.runs}
    t = {"top1": top1_table(sp, arms)}
    if "ctl" in sp.runs:
        t["paired"] = paired_table(sp, arms)
    t["per_class"] = per_class_table(sp, arms)
    if "ctl" in sp.runs:
        t["per_class_paired"] = per_class_paired_table(sp, arms)
    if sp.counts and len(set(sp.counts)) > 1:
        t["shots"] = shots_table(sp, arms)
        if "ctl" in sp.runs:
            t["shots_paired"] = shots_paired_table(sp, arms)
    for key in PENALTY_KEYS:
        t[key] = penalty_table(sp, arms, key)
    t["heldout"] = heldout_table(sp, arms)
    if "ctl" in sp.runs:
        t["heldout_paired"] = heldout_paired_table(sp, arms)
    t["walltime"] = walltime_table(sp, arms)
    return t


def _arm_name(alpha: str) -> str:
    return f"sharea{alpha.replace('.', 'p')}"


def short(arm: str) -> str:
    """A column name for an arm: ``official``, ``share``, ``trueonly``, ``share 0.34``."""
    m = re.fullmatch(r"sharea(\d+)p(\d+)", arm)
    return f"share {m.group(1)}.{m.group(2)}" if m else arm


def round3_tables(sp: StartPoint) -> dict[str, str]:
    """Round three (docs/results.md, "Round three"): the grid on the hold-out, the choice, and
    the chosen alpha against the control, reported as the round-two arms are."""
    choice = json.loads((sp.root / "chosen_alpha.json").read_text())
    rule = f"{sp.alpha['alpha_share']:.2g}"
    ctl0 = sp.runs["ctl"][0]
    rows = [["0 (control)", "ctl_s0", f"{choice['control_held_out_top1']:.2f}", "-", "-",
             f"{ctl0.heldout['irr_share']:.4f}", f"{ctl0.top1:.2f}"]]  # fmt: skip
    for alpha, held in sorted(choice["held_out_top1"].items(), key=lambda kv: -float(kv[0])):
        run = sp.runs["share" if alpha == rule else _arm_name(alpha)][0]
        mark = " (chosen)" if alpha == choice["chosen"] else ""
        rows.append([f"{alpha}{' (rule)' if alpha == rule else ''}{mark}", run.name,
                     f"{held:.2f}", f"{held - choice['control_held_out_top1']:+.2f}",
                     "yes" if alpha in choice["qualifying"] else "no",
                     f"{run.heldout['irr_share']:.4f}", f"{run.top1:.2f}"])  # fmt: skip
    head = ["alpha", "run (seed 0)", "held-out top-1 (final, `summary.csv`)", "Δ to control",
            f"within {choice['tolerance']} of control?", "held-out irrelevant share",
            "test top-1 (read after the choice)"]  # fmt: skip
    t = {"grid": _table(head, rows)}
    chosen = choice["chosen"]
    key = "share" if chosen == rule else _arm_name(chosen)
    arms = {"ctl": ARMS["ctl"], key: f"share (alpha {chosen}, chosen on the hold-out)"}
    if key != "share":
        arms["share"] = f"share (alpha {rule}, the rule)"
    t["top1"] = top1_table(sp, arms)
    t["paired"] = paired_table(sp, arms)
    t["per_class"] = per_class_table(sp, arms)
    t["per_class_paired"] = per_class_paired_table(sp, arms)
    t["shots"] = shots_table(sp, arms)
    t["shots_paired"] = shots_paired_table(sp, arms)
    t["heldout"] = heldout_table(sp, arms)
    t["heldout_paired"] = heldout_paired_table(sp, arms)
    t["train_md_irr_share"] = penalty_table(sp, arms, "train_md_irr_share")
    t["walltime"] = walltime_table(
        sp, {_arm_name(a): "" for a in choice["held_out_top1"] if a != rule}
    )
    return t


TITLES = {
    "top1": "Final test top-1 / top-5 (%), every run",
    "paired": "Paired difference to the control (same seed), final test top-1 (points)",
    "per_class": "Per-class test accuracy (%), final epoch, mean over seeds",
    "per_class_paired": "Per-class paired difference to the control (points), mean [95% CI], p",
    "shots": "Many / medium / few-shot test accuracy (%), mean of per-class accuracy",
    "shots_paired": "Many / medium-shot paired difference to the control (points)",
    "train_md_channel": "Penalty terms per epoch (training batches, mean over seeds): "
    "`train_md_channel`",
    "train_md_irr_mass": "`train_md_irr_mass`",
    "train_md_irr_share": "`train_md_irr_share`",
    "heldout": "Held-out statistic: true-class gradient at the diagnosed layer",
    "heldout_paired": "Held-out irrelevant share, paired difference to the control",
    "walltime": "Wall time and load per run",
    "grid": "The alpha grid on the hold-out (seed 0)",
}


def figure(sp: StartPoint, path: str) -> None:
    """The three penalty curves of every run; the legend below the axes, clear of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in sp.runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.1), layout="constrained")
    titles = ("own channel term (control: official, monitored)", "irrelevant mass (true class)",
              "irrelevant share (true class)")  # fmt: skip
    for ax, key, title in zip(axes, PENALTY_KEYS, titles):
        for arm in arms:
            for i, s in enumerate(_seeds(sp, arm)):
                ys = [float(r[key]) for r in sp.runs[arm][s].rows]
                ax.plot(range(1, len(ys) + 1), ys, color=f"C{list(ARMS).index(arm)}", alpha=0.8,
                        marker="o", ms=2.5, label=ARMS[arm] if i == 0 else None)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch (8 optimizer steps each)")
        ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(arms), fontsize=9)
    fig.savefig(path, dpi=110)


def markdown(tables: dict[str, str]) -> str:
    return "\n\n".join(f"#### {TITLES[k]}\n\n{v}" for k, v in tables.items()) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True, help="experiments/results/round2/<sp>")
    p.add_argument("--round3", action="store_true", help="round three's tables instead")
    p.add_argument("--figure", default="", help="also draw the penalty curves (PNG)")
    a = p.parse_args()
    sp = load(a.results)
    tables = round3_tables(sp) if a.round3 else round2_tables(sp)
    print(f"<!-- {len(tables)} tables; {PRIMARY} primary comparisons in round two, "
          f"Bonferroni threshold {bonferroni(0.05, PRIMARY):.4f} -->\n")  # fmt: skip
    print(markdown(tables))
    if a.figure:
        figure(sp, a.figure)
        print(f"figure: {a.figure}", file=sys.stderr)


if __name__ == "__main__":
    main()
