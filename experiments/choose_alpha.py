#!/usr/bin/env python3
"""Choose the share penalty's alpha on start point B's hold-out (docs/results.md, round three).

The rule, fixed before any run: among the grid, the LARGEST alpha whose final held-out top-1
(seed 0; the last row of the run's ``summary.csv``, evaluated on the 1,000 held-out training
images) is at most ``--tolerance`` (0.5) points below the control's (``ctl_s0``); if none
qualifies, the smallest alpha of the grid. The rule's alpha (``--rule-alpha``) is round two's
``share_s0``. Only
``summary.csv`` is read: never a test file. Prints the chosen alpha; ``--out`` records the
inputs and the choice as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def held_out_top1(run: Path) -> float:
    """The final evaluation's top-1 on the hold-out (the run's validation split)."""
    with open(run / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval_top1") not in (None, "")]
    if not rows:
        raise SystemExit(f"error: {run}/summary.csv has no evaluation row")
    return float(rows[-1]["eval_top1"])


def run_name(alpha: str, rule: str) -> str:
    return "share_s0" if alpha == rule else f"sharea{alpha.replace('.', 'p')}_s0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="start point B's run folder")
    p.add_argument("--grid", nargs="+", required=True, help="alphas, as the script names them")
    p.add_argument("--rule-alpha", required=True, help="the grid value that is share_s0")
    p.add_argument("--tolerance", type=float, default=0.5, help="points below the control")
    p.add_argument("--out", type=Path, default=None, help="JSON record of the choice")
    a = p.parse_args()
    control = held_out_top1(a.runs / "ctl_s0")
    held = {alpha: held_out_top1(a.runs / run_name(alpha, a.rule_alpha)) for alpha in a.grid}
    ok = [alpha for alpha in a.grid if held[alpha] >= control - a.tolerance]
    chosen = max(ok, key=float) if ok else min(a.grid, key=float)
    if a.out:
        rec = dict(
            control_held_out_top1=control,
            held_out_top1=held,
            tolerance=a.tolerance,
            qualifying=ok,
            chosen=chosen,
        )
        a.out.write_text(json.dumps(rec, indent=1) + "\n")
    print(chosen)


if __name__ == "__main__":
    main()
