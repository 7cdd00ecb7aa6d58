"""Tables (markdown) and the penalty-curve figure for round two (``round2_cifar10*.sh``).

    python experiments/summarize_round2.py --runs experiments/runs/round2_cifar10 \
        --start-dir /work/shared/checkpoints/resnet20_cifar10_e30 --figure docs/round2_penalty.png
    python experiments/summarize_round2.py --runs experiments/runs/round2_cifar10_lt \
        --start-dir experiments/runs/round2_cifar10_lt/baseline

A run trained with ``--val-from-train`` (start point B) has its single test evaluation in
``test_results.json``; that is what is reported as "test" (its ``summary.csv`` holds the
hold-out). With a long-tailed start point (``train_counts.json`` of the start run is unequal)
the many/medium/few-shot table is added.

Every finished run (``<run>/DONE``) is reported, grouped by arm (the name before ``_s<seed>``):
final-epoch test top-1/top-5, the paired difference to the control of the same seed, per-class
accuracy, the per-epoch penalty terms (``train_md_channel``, ``train_md_irr_mass``,
``train_md_irr_share``) and the held-out statistic (``<run>.heldout.json``). Nothing is selected.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ARMS = {
    "ctl": "control (alpha 0, monitored)",
    "official": "official (alpha 0.078)",
    "share": "share (scale-invariant)",
    "trueonly": "true-class only (alpha 0.078)",
}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ms(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


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


def load_runs(runs: Path) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for d in sorted(runs.iterdir()):
        m = re.fullmatch(r"(\w+?)_s(\d+)", d.name)
        if not (d.is_dir() and m and (d / "DONE").exists()):
            continue
        arm, seed = m.group(1), int(m.group(2))
        rows = _rows(d / "summary.csv")
        final, pc = _final_test(d, rows)
        held = runs / f"{d.name}.heldout.json"
        load = runs / f"{d.name}.load"
        out[arm][seed] = {
            "rows": rows,
            "final": final,
            "per_class": pc,
            "heldout": json.loads(held.read_text()) if held.exists() else None,
            "load": load.read_text().strip().replace("\n", "; ") if load.exists() else "",
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--start-dir", required=True, help="the start checkpoint's run folder")
    p.add_argument("--figure", default="")
    a = p.parse_args()
    runs = Path(a.runs)
    data = load_runs(runs)
    arms = [k for k in ARMS if k in data]
    start_dir = Path(a.start_dir)
    start_sum, start_pc = _final_test(start_dir, _rows(start_dir / "summary.csv"))
    counts_file = start_dir / "train_counts.json"
    counts = json.loads(counts_file.read_text())["counts"] if counts_file.exists() else None
    start_held = runs / "start.heldout.json"
    start_held = json.loads(start_held.read_text()) if start_held.exists() else None
    alpha = json.loads((runs / "start" / "alpha.json").read_text())
    out: list[str] = []
    w = out.append

    w("#### Final test top-1 / top-5 (%), every run\n")
    w("| arm | seeds | top-1 per seed | top-1 mean ± std | top-5 mean ± std |")
    w("|---|---|---|---|---|")
    w(f"| start checkpoint | - | {float(start_sum['eval_top1']):.2f} | "
      f"{float(start_sum['eval_top1']):.2f} | {float(start_sum['eval_top5']):.2f} |")  # fmt: skip
    for arm in arms:
        seeds = sorted(data[arm])
        t1 = [float(data[arm][s]["final"]["eval_top1"]) for s in seeds]
        t5 = [float(data[arm][s]["final"]["eval_top5"]) for s in seeds]
        w(f"| {ARMS[arm]} | {','.join(map(str, seeds))} | {' / '.join(f'{v:.2f}' for v in t1)} "
          f"| {ms(t1)} | {ms(t5)} |")  # fmt: skip
    w("")
    if "ctl" in data:
        w("#### Paired difference to the control (same seed), final test top-1 (points)\n")
        w("| arm | per seed | mean ± std | better in | beats control by > 2 std? |")
        w("|---|---|---|---|---|")
        for arm in arms:
            if arm == "ctl":
                continue
            seeds = sorted(set(data[arm]) & set(data["ctl"]))
            d = [
                float(data[arm][s]["final"]["eval_top1"])
                - float(data["ctl"][s]["final"]["eval_top1"])
                for s in seeds
            ]
            if len(d) >= 2:
                m, sd = statistics.mean(d), statistics.stdev(d)
                verdict = "yes" if m > 2 * sd else ("no (worse)" if m < 0 else "no")
            else:
                verdict = "n/a (one seed)"
            w(f"| {ARMS[arm]} | {' / '.join(f'{v:+.2f}' for v in d)} | {ms(d)} | "
              f"{sum(v > 0 for v in d)}/{len(d)} | {verdict} |")  # fmt: skip
        w("")

    w("#### Per-class test accuracy (%), final epoch, mean over seeds\n")
    classes = list(start_pc)
    head = "| class | start | " + " | ".join(ARMS[a_] for a_ in arms)
    head += "".join(f" | {a_} − control" for a_ in arms if a_ != "ctl" and "ctl" in data)
    w(head + " |")
    w("|---" * (2 + len(arms) + sum(1 for a_ in arms if a_ != "ctl" and "ctl" in data)) + "|")
    for c in classes:
        means = {a_: statistics.mean(data[a_][s]["per_class"][c] for s in data[a_]) for a_ in arms}
        cells = [f"{float(start_pc[c]):.2f}"] + [f"{means[a_]:.2f}" for a_ in arms]
        if "ctl" in data:
            cells += [f"{means[a_] - means['ctl']:+.2f}" for a_ in arms if a_ != "ctl"]
        w(f"| {c} | " + " | ".join(cells) + " |")
    w("")

    if counts and len(set(counts)) > 1:
        from md_plugin.metrics import SHOT_GROUPS, shot_accuracy, shot_groups

        groups = shot_groups(counts)
        present = [g for g in SHOT_GROUPS if groups[g]]  # CIFAR-10-LT has no few-shot class
        w("#### Many / medium / few-shot test accuracy (%), mean of per-class accuracy\n")
        w("Groups by training images per class (> 100, 20-100, < 20): "
          + "; ".join(f"{g} = classes {groups[g]}" for g in SHOT_GROUPS) + ".\n")  # fmt: skip
        w(
            "| arm | "
            + " | ".join(present)
            + " | paired Δ to control ("
            + ", ".join(present)
            + ") |"
        )
        w("|---" * (2 + len(present)) + "|")

        def shots(pc: dict[str, float]) -> dict[str, float]:
            return shot_accuracy([pc[c] for c in classes], counts)

        st = shots(start_pc)
        w("| start checkpoint | " + " | ".join(f"{st[g]:.2f}" for g in present) + " | - |")
        for arm in arms:
            per_seed = {s: shots(data[arm][s]["per_class"]) for s in sorted(data[arm])}
            cells = [ms([v[g] for v in per_seed.values()]) for g in present]
            delta = "-"
            if arm != "ctl" and "ctl" in data:
                seeds = sorted(set(per_seed) & set(data["ctl"]))
                ctl = {s: shots(data["ctl"][s]["per_class"]) for s in seeds}
                delta = ", ".join(ms([per_seed[s][g] - ctl[s][g] for s in seeds]) for g in present)
            w(f"| {ARMS[arm]} | " + " | ".join(cells) + f" | {delta} |")
        w("")

    w("#### Penalty terms per epoch (training batches, mean over seeds)\n")
    w("`md_channel` is each arm's own loss term (the control's is the official term, computed "
      "with `--md-monitor`); `irr_mass` and `irr_share` are the same statistics in every arm. "
      f"At the start point (eval mode, first 1,024 training images): official {alpha['official']:.2f}, "
      f"irr_mass {alpha['true_only']:.3f}, irr_share {alpha['share']:.4f}.\n")  # fmt: skip
    for key in ("train_md_channel", "train_md_irr_mass", "train_md_irr_share"):
        n_ep = max(len(data[a_][s]["rows"]) for a_ in arms for s in data[a_])
        w(f"`{key}`\n")
        w("| arm | " + " | ".join(f"ep {e + 1}" for e in range(n_ep)) + " |")
        w("|---" * (n_ep + 1) + "|")
        for arm in arms:
            vals = []
            for e in range(n_ep):
                v = [
                    float(data[arm][s]["rows"][e][key])
                    for s in data[arm]
                    if e < len(data[arm][s]["rows"])
                ]
                vals.append(f"{statistics.mean(v):.4g}" if v else "-")
            w(f"| {ARMS[arm]} | " + " | ".join(vals) + " |")
        w("")

    where = (
        f"{start_held['images']:,} held-out training images"
        if start_held and start_held.get("split") == "val_from_train"
        else "first 1,000 test images"
    )
    w(f"#### Held-out statistic: true-class gradient at the diagnosed layer, {where}\n")
    w("| arm | irrelevant share | irrelevant mass | relevant mass | top-1 on these images |")
    w("|---|---|---|---|---|")
    if start_held:
        w(f"| start checkpoint | {start_held['irr_share']:.4f} | {start_held['irr_mass']:.3f} | "
          f"{start_held['rel_mass']:.3f} | {start_held['top1']:.1f} |")  # fmt: skip
    for arm in arms:
        hs = [data[arm][s]["heldout"] for s in sorted(data[arm]) if data[arm][s]["heldout"]]
        w(f"| {ARMS[arm]} | {ms([h['irr_share'] for h in hs], 4)} | "
          f"{ms([h['irr_mass'] for h in hs], 3)} | {ms([h['rel_mass'] for h in hs], 3)} | "
          f"{ms([h['top1'] for h in hs], 1)} |")  # fmt: skip
    w("")
    w("#### Wall time and load per run\n")
    w("| run | train img/s per epoch (min-max) | wall time and 1/5/15-min load (`<run>.load`) |")
    w("|---|---|---|")
    for arm in arms:
        for s in sorted(data[arm]):
            r = data[arm][s]
            log = (runs / f"{arm}_s{s}.log").read_text()
            ips = [int(v) for v in re.findall(r"\| (\d+) img/s", log)]
            rate = f"{min(ips)}-{max(ips)}" if ips else "-"
            w(f"| {arm}_s{s} | {rate} | {r['load']} |")
    print("\n".join(out))

    if a.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
        keys = [
            ("train_md_channel", "own channel term (control: official, monitored)"),
            ("train_md_irr_mass", "irrelevant mass (true class)"),
            ("train_md_irr_share", "irrelevant share (true class)"),
        ]
        for ax, (key, title) in zip(axes, keys):
            for arm in arms:
                for i, s in enumerate(sorted(data[arm])):
                    ys = [float(r[key]) for r in data[arm][s]["rows"]]
                    ax.plot(range(1, len(ys) + 1), ys, color=f"C{list(ARMS).index(arm)}",
                            alpha=0.8, label=ARMS[arm] if i == 0 else None)  # fmt: skip
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch (8 optimizer steps each)")
            if key == "train_md_channel":
                ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.savefig(a.figure, dpi=110)
        print(f"\nfigure: {a.figure}")


if __name__ == "__main__":
    main()
