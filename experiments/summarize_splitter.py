"""The CNNSplitter round-two tables and figure, rebuilt from the raw files of
``experiments/splitter_compare.py`` (``experiments/results/splitter/round2/``).

Statistics: a split's composed loss is (strong - composed) / 100 on CIFAR-10's test images of
classes 0-4; mean ± sample SD over the search seeds. A patch's change is after - before on the
weak task's test split; the unit of the paired t-test is the TC (3 TCs, each the mean over the
seeds of that method), so n = 3, 2 degrees of freedom, and the 95% CI is over TCs.

    python experiments/summarize_splitter.py --results experiments/results/splitter/round2 \\
        [--figure docs/figures/splitter_round2.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import fmt_ci, fmt_p, from_diffs  # noqa: E402

STRONG = {
    "r20": "resnet20_cifar (BN, 16-64 ch.)",
    "simcnn": "simcnn_cifar ×0.5 (no BN, 32-256 ch.)",
}
METHODS = {  # table order; the name of a split run is {strong}_{method}_s{seed}
    "ga_affine_nocal": "GA, --init-ratios auto, no calibration (the paper's unadapted modules)",
    "ga_affine": "GA, --init-ratios auto, --calibrate affine (the default)",
    "grad_ones_affine": "gradient, --mask-init ones (GradSplitter's), affine",
    "grad_t60_affine": "gradient, ones, --target-kernels 0.6 --kernel-alpha 1, affine",
    "grad_t60_none": "gradient, ones, target 0.6, alpha 1, no calibration (same masks)",
    "grad_t60e46_affine": "gradient, ones, target 0.6, alpha 1, --epochs 46, affine",
    "grad_auto_affine": "gradient, --mask-init auto (ones; sensitivity's kernel target), affine",
    "grad_autov1_affine": "gradient, first --mask-init auto (masks at the sensitivity's ratios; replaced), affine",
    "grad_autov1_t60_affine": "first --mask-init auto, --target-kernels 0.6, affine",
}
PATCH = {"ga_affine": "GA + affine module (own-logit range)",
         "grad_ones_affine": "gradient (ones) + affine module, head score",
         "grad_ones_affine+range": "the same, own-logit range",
         "grad_t60_affine": "gradient (ones, target 0.6) + affine, head score",
         "grad_t60_affine+range": "the same, own-logit range",
         "diagnosis": "diagnosis module (Model Doctor, last conv)", "whole_strong": "whole strong model"}  # fmt: skip
KEYS = [("tc_precision", "TC precision"), ("tc_recall", "TC recall"), ("tc_f1", "TC F1"),
        ("non_tc_acc", "non-TC acc.")]  # fmt: skip
STAGES = ("importance", "sensitivity", "search", "calibration", "measure")
PAPER_LOSS = 2.89  # points, the paper's average composed loss (0.0289)
PAPER_FLOPS = (43, 57)  # % of the strong model's FLOPs, the paper's CIFAR modules


def _ms(v: list[float], digits: int = 2, signed: bool = False) -> str:
    s = "+" if signed else ""
    if len(v) == 1:
        return f"{v[0]:{s}.{digits}f}"
    return f"{statistics.mean(v):{s}.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def load(root: Path) -> tuple[list[dict], list[dict]]:
    composed = [json.loads(p.read_text()) for p in sorted((root / "composed").glob("*.json"))]
    patch = [json.loads(p.read_text()) for p in sorted((root / "patch").glob("*.json"))]
    return composed, patch


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _groups(composed: list[dict]) -> dict[tuple[str, str], list[dict]]:
    g: dict[tuple[str, str], list[dict]] = {}
    for r in composed:
        g.setdefault((r["strong"], r["method"]), []).append(r)
    return g


def splits_table(composed: list[dict]) -> str:
    g = _groups(composed)
    rows = []
    for s in STRONG:
        for m in METHODS:
            rs = g.get((s, m))
            if not rs:
                continue
            acc = [r["test"]["composed_acc"] for r in rs]
            loss = [(r["test"]["strong_acc"] - r["test"]["composed_acc"]) / 100 for r in rs]
            rows.append([
                s, METHODS[m], str(len(rs)), _ms(acc), f"{rs[0]['test']['strong_acc']:.2f}",
                _ms(loss, 3), _ms([r["kernels_pct"] for r in rs], 1),
                _ms([r["flops_pct"] for r in rs], 1),
            ])  # fmt: skip
    head = ["strong", "split", "seeds", "composed test acc. (%)", "strong (%)", "composed loss",
            "kernels kept (%)", "FLOPs (%)"]  # fmt: skip
    return _table(head, rows)


def goal_table(composed: list[dict], max_kernels: float = 60.0) -> str:
    """Per strong model, the split with the smallest composed loss at <= ``max_kernels``."""
    rows = []
    for s in STRONG:
        ok = [r for r in composed if r["strong"] == s and r["kernels_pct"] <= max_kernels]
        if not ok:
            rows.append([s, f"no split at <= {max_kernels:g}% of the kernels", "-", "-"])
            continue
        best = min(ok, key=lambda r: r["test"]["strong_acc"] - r["test"]["composed_acc"])
        loss = (best["test"]["strong_acc"] - best["test"]["composed_acc"]) / 100
        rows.append([s, best["run"], f"{loss:.3f}", f"{best['kernels_pct']:.1f}"])
    return _table(["strong", "best split at <= 60% kernels", "composed loss", "kernels (%)"], rows)


def cost_table(composed: list[dict]) -> str:
    g = _groups(composed)
    rows = []
    for s in STRONG:
        for m in METHODS:
            rs = [r for r in g.get((s, m), []) if r.get("timings") and not m.endswith("_nocal")]
            if not rs:
                continue
            cells = []
            for st in STAGES:
                v = [r["timings"].get(f"{st}_cpu_s") for r in rs]
                cells.append(_ms([x for x in v], 0) if all(x is not None for x in v) else "-")
            tot = [sum(r["timings"].get(f"{st}_cpu_s", 0.0) for st in STAGES) for r in rs]
            rows.append([s, m, str(len(rs)), *cells, _ms(tot, 0)])
    return _table(["strong", "split", "runs", *STAGES, "total CPU s"], rows)


def _per_tc(patch: list[dict], strong: str, variant: str) -> dict[int, dict[str, list[float]]]:
    """TC -> key -> changes (after - before) of every seed of ``variant``."""
    out: dict[int, dict[str, list[float]]] = {}
    for r in patch:
        v = r["variant"]
        if v in ("diagnosis", "whole_strong"):
            name = v
        else:
            name = v.removesuffix("_range").split("_", 1)[1].rsplit("_s", 1)[0]
            name += "+range" if r.get("rule") == "range" else ""
        if r["strong"] != strong or name != variant:
            continue
        d = out.setdefault(r["tc"], {k: [] for k, _ in KEYS})
        for k, _ in KEYS:
            d[k].append(r["after"][k] - r["before"][k])
    return out


def patch_table(patch: list[dict]) -> str:
    rows = []
    for s in STRONG:
        for v in PATCH:
            per = _per_tc(patch, s, v)
            if not per:
                continue
            tcs = sorted(per)
            n_each = sorted({len(per[t]["tc_f1"]) for t in tcs})
            cells = []
            for k, _ in KEYS:
                means = [statistics.mean(per[t][k]) for t in tcs]
                r = from_diffs(means) if len(means) > 1 else None
                cells.append(f"{r.mean:+.2f} {fmt_ci(r.ci)}" if r else f"{means[0]:+.2f}")
            f1 = from_diffs([statistics.mean(per[t]["tc_f1"]) for t in tcs])
            nt = from_diffs([statistics.mean(per[t]["non_tc_acc"]) for t in tcs])
            rows.append([s, PATCH[v], f"{len(tcs)} × {'/'.join(map(str, n_each))}", *cells,
                         f"{fmt_p(f1.p)} / {fmt_p(nt.p)}"])  # fmt: skip
    head = ["strong", "patch", "TCs × seeds", *(f"{lab} change [95% CI]" for _, lab in KEYS),
            "p (F1 / non-TC)"]  # fmt: skip
    return _table(head, rows)


def versus_whole_table(patch: list[dict]) -> str:
    """Each split method's F1 and non-TC changes minus the whole strong model's, paired by TC."""
    rows = []
    for s in STRONG:
        whole = _per_tc(patch, s, "whole_strong")
        for v in PATCH:
            if v == "whole_strong":
                continue
            per = _per_tc(patch, s, v)
            tcs = sorted(set(per) & set(whole))
            if len(tcs) < 2:
                continue
            cells = []
            for k in ("tc_f1", "non_tc_acc"):
                r = from_diffs([statistics.mean(per[t][k]) - whole[t][k][0] for t in tcs])
                cells.append(f"{r.mean:+.2f} {fmt_ci(r.ci)} (p = {fmt_p(r.p)})")
            rows.append([s, PATCH[v], str(len(tcs)), *cells])
    return _table(["strong", "patch", "TCs", "TC F1 minus whole strong", "non-TC minus whole strong"],
                  rows)  # fmt: skip


def tables(root: Path) -> dict[str, str]:
    composed, patch = load(root)
    return {
        "splits": splits_table(composed),
        "goal": goal_table(composed),
        "patch": patch_table(patch),
        "versus_whole": versus_whole_table(patch),
        "cost": cost_table(composed),
    }


def figure(root: Path, path: str) -> None:
    """Composed test accuracy against kernels kept, one panel per strong model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    composed, _ = load(root)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained", sharey=True)
    for ax, s in zip(axes, STRONG):
        rs = [r for r in composed if r["strong"] == s]
        if not rs:
            continue
        strong = rs[0]["test"]["strong_acc"]
        ax.axhline(strong, color="k", ls="--", lw=1, label="strong model (dashed)")
        for i, m in enumerate(METHODS):
            pts = [r for r in rs if r["method"] == m]
            if pts:
                ax.scatter([r["kernels_pct"] for r in pts], [r["test"]["composed_acc"] for r in pts],
                           color=f"C{i}", marker="os^v<DPXhp"[i], s=40, label=METHODS[m])  # fmt: skip
        lo, hi = PAPER_FLOPS
        ax.errorbar([(lo + hi) / 2], [strong - PAPER_LOSS], xerr=[[(hi - lo) / 2], [(hi - lo) / 2]],
                    color="crimson", marker="*", ms=12, capsize=4,
                    label="paper: loss 0.029 at 43-57% FLOPs (its nets; x is FLOPs)")  # fmt: skip
        ax.set_title(STRONG[s], fontsize=10)
        ax.set_xlabel("kernels kept (% of the strong model, mean over modules)")
        ax.set_xlim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("composed accuracy, CIFAR-10 test, classes 0-4 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    for h, lab in zip(*axes[1].get_legend_handles_labels()):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--figure", default="")
    a = p.parse_args()
    for k, v in tables(a.results).items():
        print(f"<!-- {k} -->\n{v}\n")
    if a.figure:
        figure(a.results, a.figure)


if __name__ == "__main__":
    main()
