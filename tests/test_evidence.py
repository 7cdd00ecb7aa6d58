"""The evidence behind docs/results.md and docs/benchmarks.md (issue 22).

* ``experiments/stats.py``: the paired t-test, its 95% CI and Bonferroni against hand-computed
  values (the issue's audit numbers) and Student-t table values; scipy, where installed, as a
  second reference over a grid.
* Every round-two and round-three table in docs/results.md, and the ``--md-every`` tables in
  docs/benchmarks.md, rebuilt from the committed raw files (``experiments/results/``) and found
  verbatim in the docs: the docs cannot drift from the files.
* ``experiments/collect_results.py`` copies a runs folder into that layout, byte for byte,
  without checkpoints and without unfinished runs.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import collect_results  # noqa: E402
import md_every  # noqa: E402
import summarize_round2 as s2  # noqa: E402
import summarize_splitter as ssp  # noqa: E402
from stats import (  # noqa: E402
    bonferroni,
    fmt_ci,
    fmt_p,
    from_diffs,
    paired,
    t_quantile,
    t_two_sided_p,
)

RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs"


# ---------------------------------------------------------------- statistics


def test_paired_t_matches_the_audit_numbers():
    # Round two as first documented, start point B, official - control per seed.
    r = from_diffs([0.45, 0.55, 0.24])
    assert r.mean == pytest.approx(0.41333, abs=1e-5)
    assert r.sd == pytest.approx(0.15822, abs=1e-5)
    assert r.t == pytest.approx(4.5248, abs=1e-4)
    assert fmt_p(r.p) == "0.046"
    assert fmt_ci(r.ci) == "[+0.02, +0.81]"
    assert r.two_sd and r.better == 3
    assert fmt_p(from_diffs([0.30, 0.09, 0.14]).p) == "0.11"  # B true-class only
    assert fmt_p(from_diffs([-0.38, -0.04, -0.30]).p) == "0.14"  # A official


def test_paired_is_a_minus_b_in_seed_order():
    r = paired([66.70, 66.22, 66.66], [67.15, 66.77, 66.90])
    assert r.diffs == pytest.approx((-0.45, -0.55, -0.24))
    with pytest.raises(ValueError, match="differ in length"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        from_diffs([0.1])


def test_two_sd_rule_is_t_above_3_46_on_2_df():
    # mean = 2 SD with n = 3 is t = 2 sqrt(3); on 2 df P(|T| >= t) = 1 - t / sqrt(t^2 + 2).
    t = 2 * math.sqrt(3)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(0.07418, abs=1e-5)


@pytest.mark.parametrize(
    "q, df, table",
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 3, 3.1824),
        (0.975, 10, 2.2281),
        (0.95, 2, 2.9200),
        (0.995, 5, 4.0321),
        (0.025, 2, -4.3027),
    ],
)
def test_t_quantile_matches_the_t_table(q, df, table):
    assert t_quantile(q, df) == pytest.approx(table, abs=1e-4)
    assert t_two_sided_p(t_quantile(q, df), df) == pytest.approx(2 * min(q, 1 - q), rel=1e-9)


def test_t_distribution_agrees_with_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 8, 9, 30):
        for t in (0.0, 0.2, 1.0, 2.5, 4.52, 13.0, 80.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * st.t.sf(t, df), rel=1e-9, abs=1e-15)
        assert t_quantile(0.975, df) == pytest.approx(st.t.ppf(0.975, df), rel=1e-9)


def test_bonferroni_and_edge_cases():
    assert bonferroni(0.05, 6) == pytest.approx(0.05 / 6)
    with pytest.raises(ValueError):
        bonferroni(0.05, 0)
    with pytest.raises(ValueError, match="positive integer"):
        t_two_sided_p(1.0, 2.5)
    same = from_diffs([0.1, 0.1, 0.1])  # no spread: p 0, the CI is the point
    assert same.p == 0.0 and same.ci == pytest.approx((0.1, 0.1))
    assert fmt_p(0.03) == "0.030" and fmt_p(0.5) == "0.50" and fmt_p(1e-6) == "< 0.0001"


# ---------------------------------------------------------------- docs vs committed files


def _missing(tables: dict[str, str], doc: str) -> list[str]:
    return [name for name, table in tables.items() if table not in doc]


@pytest.mark.parametrize("start_point", ["cifar10", "cifar10_lt"])
def test_round_two_tables_in_the_docs_rebuild_from_the_raw_files(start_point):
    sp = s2.load(RESULTS / "round2" / start_point)
    tables = s2.round2_tables(sp)
    assert {"top1", "paired", "per_class_paired", "heldout_paired", "walltime"} <= set(tables)
    assert len(sp.runs["ctl"]) == 3
    assert _missing(tables, (DOCS / "results.md").read_text()) == []


def test_round_three_tables_in_the_docs_rebuild_from_the_raw_files():
    sp = s2.load(RESULTS / "round2" / "cifar10_lt")
    tables = s2.round3_tables(sp)
    assert _missing(tables, (DOCS / "results.md").read_text()) == []


def test_md_every_tables_in_the_benchmarks_rebuild_from_the_raw_files():
    main, pairs = md_every.summarize(RESULTS / "md_every").split("\n\n")
    doc = (DOCS / "benchmarks.md").read_text()
    assert main in doc and pairs in doc


def test_splitter_round_two_tables_in_the_docs_rebuild_from_the_raw_files():
    root = RESULTS / "splitter" / "round2"
    tables = ssp.tables(root)
    composed, patch = ssp.load(root)
    assert len(composed) >= 12 and len(patch) >= 30  # both strong models, 3 TCs, every variant
    assert _missing(tables, (DOCS / "splitter.md").read_text()) == []


def test_splitter_patch_statistics_are_over_tcs_of_seed_means():
    patch = [
        {"strong": "r20", "tc": tc, "variant": f"r20_ga_affine_s{s}",
         "before": {k: 50.0 for k, _ in ssp.KEYS},
         "after": {k: 50.0 + tc + s for k, _ in ssp.KEYS}}
        for tc in (0, 2, 4) for s in (0, 1, 2)
    ]  # fmt: skip
    per = ssp._per_tc(patch, "r20", "ga_affine")
    assert per[2]["tc_f1"] == [2.0, 3.0, 4.0]
    row = ssp.patch_table(patch).splitlines()[2]
    # seed means per TC: 1, 3, 5 -> mean +3.00, SD 2, CI 3 +- 4.303 * 2 / sqrt(3)
    assert "| 3 × 3 |" in row and "+3.00 [-1.97, +7.97]" in row


def test_a_changed_raw_number_is_caught(tmp_path):
    """The comparison is strict: one seed's test top-1 changed by 0.01 changes a docs table."""
    src = RESULTS / "round2" / "cifar10_lt"
    dst = tmp_path / "cifar10_lt"
    shutil.copytree(src, dst)
    f = dst / "official_s1" / "test_results.json"
    text = f.read_text()
    top1 = s2.load(src).runs["official"][1].top1
    f.write_text(text.replace(f'"top1": {top1}', f'"top1": {top1 + 0.01:.2f}', 1))
    assert s2.load(dst).runs["official"][1].top1 == pytest.approx(top1 + 0.01)
    missing = _missing(s2.round2_tables(s2.load(dst)), (DOCS / "results.md").read_text())
    assert {"top1", "paired"} <= set(missing)


# ---------------------------------------------------------------- collect_results


def _as_runs_folder(results: Path, runs: Path, names: list[str]) -> None:
    """The committed layout written back as a runs folder (what the experiment scripts leave)."""
    for sub in ("baseline", "start"):
        shutil.copytree(results / sub, runs / sub)
    (runs / "start" / "heldout.json").rename(runs / "start.heldout.json")
    (runs / "start" / "prepare.log").rename(runs / "prepare.log")
    (runs / "baseline" / "train.log").rename(runs / "baseline.log")
    for name in names:
        d = runs / name
        d.mkdir()
        for f in (results / name).iterdir():
            target = {"heldout.json": f"{name}.heldout.json", "load.txt": f"{name}.load",
                      "train.log": f"{name}.log"}.get(f.name)  # fmt: skip
            shutil.copyfile(f, runs / target if target else d / f.name)
        (d / "DONE").touch()
        (d / "last.pth.tar").write_bytes(b"checkpoint")


def test_collect_copies_the_small_files_and_nothing_else(tmp_path, capsys):
    results = RESULTS / "round2" / "cifar10_lt"
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    _as_runs_folder(results, runs, ["ctl_s0", "share_s1"])
    (runs / "official_s0").mkdir()  # still training: no DONE, no held-out statistic
    assert collect_results.collect(runs, out) == ["ctl_s0", "share_s1"]
    assert "official_s0" in capsys.readouterr().err
    copied = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    expected = sorted(
        p.relative_to(results)
        for sub in ("baseline", "start", "ctl_s0", "share_s1")
        for p in (results / sub).iterdir()
    )
    assert copied == expected
    for rel in copied:
        assert (out / rel).read_bytes() == (results / rel).read_bytes(), rel


def test_collect_refuses_a_folder_that_is_not_a_runs_folder(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        collect_results.collect(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="summary.csv is missing"):
        collect_results.collect(tmp_path / "runs", tmp_path / "out")


# ---------------------------------------------------------------- figures


def test_overlay_figures_can_share_one_colour_scale(tmp_path):
    """overlay_limits over one figure's maps gives the limits the figure chooses itself; over
    several, the same percentiles over all of their maps (the two round-two overlay figures)."""
    import numpy as np

    from md_plugin.report.plots import (
        gradient_shares_map,
        overlay_limits,
        plot_gradient_overlays,
        robust_limit,
        upsample_bilinear,
    )

    rng = np.random.default_rng(0)
    before, after1, after2 = (rng.random((2, 4, 4)) ** k for k in (1, 3, 6))
    up = [np.stack([upsample_bilinear(m, (8, 8)) for m in gradient_shares_map(x)])
          for x in (before, after1, after2)]  # fmt: skip
    one = overlay_limits((8, 8), before, [after1])
    assert one == (robust_limit(np.concatenate(up[:2])), robust_limit(up[1] - up[0]))
    both = overlay_limits((8, 8), before, [after1, after2])
    diffs = np.concatenate([up[1] - up[0], up[2] - up[0]])
    assert both == (robust_limit(np.concatenate(up)), robust_limit(diffs)) != one
    images = rng.random((2, 8, 8, 3))
    for i, after in enumerate((after1, after2)):
        out = plot_gradient_overlays(tmp_path / f"o{i}.png", images, ["a", "b"], [0, 1], before,
                                     after, limits=both)  # fmt: skip
        assert out.stat().st_size > 0
