"""End-to-end runs of train_md.py and md-doctor on tiny data (single process)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from md_plugin.cli import main as doctor_main
from md_plugin.doctor import Diagnosis
from md_plugin.train.main import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet20_cifar", "--dataset", "torch/cifar10", "-b", "20", "--lr", "0.05",
        "--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0",
        "--no-progress", "--log-interval", "0", "--seed", "0", "--crop-padding", "2",
        "--color-jitter", "0"]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def baseline_run(cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the run logs to sys.stdout: keep its log
        rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "2", "--output", str(out),
                         "--experiment", "base"])  # fmt: skip
    assert rc == 0
    (out / "base.log").write_text(log.getvalue())  # beside the run folder, not in it
    return out / "base"


def test_plain_run_writes_timm_style_outputs(baseline_run):
    rows = _rows(baseline_run / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for col in ("train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"):
        assert col in rows[0]
    assert 0.0 <= float(rows[-1]["eval_top1"]) <= 100.0
    args = yaml.safe_load((baseline_run / "args.yaml").read_text())
    assert args["model"] == "resnet20_cifar" and args["epochs"] == 2 and args["lr"] == 0.05
    ck = torch.load(baseline_run / "last.pth.tar", weights_only=True)
    assert ck["epoch"] == 1 and ck["arch"] == "resnet20_cifar"
    assert {"state_dict", "optimizer", "scheduler", "args", "summary"} <= set(ck)
    assert (baseline_run / "model_best.pth.tar").exists()
    per_class = _rows(baseline_run / "per_class_acc.csv")
    assert len(per_class) == 2 and "airplane" in per_class[0]
    best = json.loads((baseline_run / "best_per_class.json").read_text())
    assert len(best["accuracy"]) == 10
    counts = json.loads((baseline_run / "train_counts.json").read_text())
    assert counts["counts"] == [20] * 10


def test_best_metric_epoch_matches_summary_row(baseline_run):
    """The "*** Best metric" epoch counts as the "Epoch N/M" lines do (summary.csv: N - 1)."""
    log = (baseline_run.parent / "base.log").read_text()
    m = re.search(r"\*\*\* Best metric: ([0-9.]+) \(epoch (\d+)\)", log)
    assert m, log
    best, n = float(m.group(1)), int(m.group(2))
    rows = _rows(baseline_run / "summary.csv")
    top1 = [float(r["eval_top1"]) for r in rows]
    # the first epoch reaching the maximum is the best one (a tie does not replace it)
    assert rows[n - 1]["epoch"] == str(n - 1) and top1[n - 1] == pytest.approx(best, abs=1e-4)
    assert best == pytest.approx(max(top1), abs=1e-4) and all(t < best for t in top1[: n - 1])
    line = next(ln for ln in log.splitlines() if ln.startswith(f"Epoch {n}/2 "))
    assert f"top1 {best:.2f}" in line
    assert json.loads((baseline_run / "best_per_class.json").read_text())["epoch"] == n - 1


def test_args_yaml_reloads_as_config(baseline_run, tmp_path):
    from md_plugin.train.args import parse_args

    a = parse_args(["-c", str(baseline_run / "args.yaml"), "--epochs", "5"])
    assert a.model == "resnet20_cifar" and a.epochs == 5 and a.crop_padding == 2


def test_existing_run_is_never_overwritten(baseline_run, cifar10_root, capsys):
    before = (baseline_run / "summary.csv").read_bytes()
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output",
                     str(baseline_run.parent), "--experiment", "base"])  # fmt: skip
    assert rc == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (baseline_run / "summary.csv").read_bytes() == before


def test_md_run_from_checkpoint_diagnoses_and_treats(baseline_run, cifar10_root, tmp_path, capsys):
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                     "--experiment", "md", "--md", "--md-per-class", "5", "--md-alpha", "0.1",
                     "--initial-checkpoint", str(baseline_run / "last.pth.tar")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "md"
    rows = _rows(run / "summary.csv")
    assert float(rows[0]["train_md_channel"]) > 0
    assert (run / "diagnosis.safetensors").exists()
    assert (run / "report" / "report.html").exists()
    out = capsys.readouterr().out
    assert "before treatment" in out and "images" in out  # the per-class diagnosis table


def test_md_monitor_control_and_share_loss_runs(baseline_run, cifar10_root, tmp_path, capsys):
    """--md-alpha 0 --md-monitor logs the would-be penalty; --md-loss share trains on the share;
    --sampler-epoch-length shortens plain-shuffled epochs; --no-md-eval-before skips the
    evaluation before treatment; all recorded in args.yaml."""
    common = TINY + ["--data-dir", str(cifar10_root), "--epochs", "2", "--output", str(tmp_path),
                     "--md", "--md-per-class", "5", "--sampler-epoch-length", "60",
                     "--no-md-report", "--no-md-eval-before",
                     "--initial-checkpoint", str(baseline_run / "last.pth.tar")]  # fmt: skip
    assert cli(common + ["--experiment", "ctl", "--md-alpha", "0", "--md-monitor"]) == 0
    diag = str(tmp_path / "ctl" / "diagnosis.safetensors")
    assert cli(common + ["--experiment", "plain", "--md-alpha", "0", "--md-diagnosis", diag]) == 0
    assert cli(common + ["--experiment", "share", "--md-alpha", "1", "--md-loss", "share",
                         "--md-diagnosis", diag]) == 0, capsys.readouterr().err  # fmt: skip
    ctl, plain, share = (_rows(tmp_path / n / "summary.csv") for n in ("ctl", "plain", "share"))
    assert len(ctl) == 2
    for r in ctl:  # monitored: the official term and the common statistics, all positive
        assert float(r["train_md_channel"]) > 0 and float(r["train_md_irr_mass"]) > 0
        assert 0 < float(r["train_md_irr_share"]) < 1
    assert float(plain[0]["train_md_channel"]) == 0.0  # not computed without --md-monitor
    # the monitor changes nothing in training: same losses as the unmonitored control
    assert [r["train_ce"] for r in ctl] == [r["train_ce"] for r in plain]
    for r in share:  # the share loss is the logged irrelevant share
        assert float(r["train_md_channel"]) == pytest.approx(float(r["train_md_irr_share"]))
        assert float(r["train_loss"]) > float(r["train_ce"])
    args = yaml.safe_load((tmp_path / "share" / "args.yaml").read_text())
    assert args["md_loss"] == "share" and args["sampler_epoch_length"] == 60
    ck = torch.load(tmp_path / "share" / "last.pth.tar", weights_only=False)
    assert ck["num_updates"] == 2 * 60 // 20  # 2 epochs of 60 images, batch 20
    log = capsys.readouterr().out
    assert "training set: 200 images" in log and "before treatment" not in log


def test_md_loss_conflicting_flags_are_one_line(cifar10_root, tmp_path, capsys):
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--output", str(tmp_path), "--md",
                     "--md-loss", "share", "--md-no-true-term"])  # fmt: skip
    assert rc == 2
    assert "true-class term" in capsys.readouterr().err


def test_md_without_a_trained_model_is_refused(cifar10_root, tmp_path, capsys):
    rc = cli(
        TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path), "--md"]
    )
    assert rc == 2 and "treats a trained model" in capsys.readouterr().err


def test_md_refuses_validation_split_diagnosis(baseline_run, cifar10_root, tmp_path, capsys):
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                     "--md", "--initial-checkpoint", str(baseline_run / "last.pth.tar"),
                     "--md-diagnosis-split", "validation"])  # fmt: skip
    assert rc == 2 and "refusing to diagnose on the validation split" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--data-dir", "/nonexistent/place"], "CIFAR10 not found"),
        (["--model", "resnet33_cifar"], "unknown model"),
        (["-b", "5000"], "larger than the training set"),
        (["--resume", "/nonexistent/last.pth.tar"], "checkpoint not found"),
    ],
)
def test_user_errors_are_one_line(cifar10_root, tmp_path, capsys, extra, msg):
    argv = (
        TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path)] + extra
    )
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


def test_md_doctor_cli_diagnose_and_report(baseline_run, cifar10_root, tmp_path, capsys):
    common = ["--model", "resnet20_cifar", "--checkpoint", str(baseline_run / "last.pth.tar"),
              "--dataset", "torch/cifar10", "--data-dir", str(cifar10_root)]  # fmt: skip
    d = tmp_path / "d.safetensors"
    assert doctor_main(["diagnose", *common, "--per-class", "5", "--out", str(d)]) == 0
    out = capsys.readouterr().out
    assert "airplane" in out and d.exists()
    assert doctor_main(["diagnose", *common, "--out", str(d)]) == 2  # no overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (
        doctor_main(["diagnose", *common, "--split", "validation", "--out", str(tmp_path / "x")])
        == 2
    )
    rep = tmp_path / "rep"
    assert doctor_main(["report", "--diagnosis", str(d), *common, "--out", str(rep)]) == 0
    assert (rep / "report.html").exists() and any(rep.glob("heatmap_*.png"))


@pytest.mark.slow
def test_quickstart_under_accelerate_launch(tmp_path):
    """The README's quickstart command (shortened), run twice in a row: each run gets its own
    folder and prints the same numbers (issue 21 item 3), with no launcher warning (item 5)."""
    pytest.importorskip("sklearn")
    env = {
        k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")
    }
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
           str(ROOT / "configs" / "accelerate_1proc.yaml"), str(ROOT / "train_md.py"),
           "--config", str(ROOT / "configs" / "quickstart.yaml"), "--epochs", "1",
           "--md-baseline-epochs", "1", "--output", str(tmp_path), "--no-progress"]  # fmt: skip
    printed = []
    for _ in range(2):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "were not passed to `accelerate launch`" not in p.stderr
        keep = ("before treatment", "*** Best metric", "Model Doctor:")  # no timings, no folder
        printed.append([ln for ln in p.stdout.splitlines() if ln.startswith(keep)])
    assert printed[0] == printed[1] and len(printed[0]) == 4, printed
    runs = sorted(tmp_path.iterdir())
    assert len(runs) == 2 and all(r.name.endswith("resnet20_cifar") for r in runs), runs
    for run in runs:
        assert _rows(run / "summary.csv")[0]["epoch"] == "0"
        assert (run / "baseline" / "summary.csv").exists() and (
            run / "report" / "report.html"
        ).exists()


@pytest.mark.slow
def test_spatial_round_trip_through_the_trainer(baseline_run, cifar10_root, tmp_path, capsys):
    """sift-low -> labelme JSON -> md-doctor masks -> train_md.py --md-masks --md-beta."""
    pytest.importorskip("labelme")
    common = ["--model", "resnet20_cifar", "--checkpoint", str(baseline_run / "last.pth.tar"),
              "--dataset", "torch/cifar10", "--data-dir", str(cifar10_root)]  # fmt: skip
    ws = tmp_path / "ws"
    rc = doctor_main(["sift-low", *common, "--low", "0.0", "--high", "1.0", "--per-class", "3",
                      "--size", "64", "--out", str(ws)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    pngs = sorted(ws.glob("*.png"))
    n = len(pngs)  # up to 3 per class: a float32 softmax of exactly 1.0 is outside [0, 1)
    assert 20 <= n <= 30
    for png in pngs:  # a person outlines the object: a 32x32 square in the 64x64 image
        shape = {"label": "object", "points": [[16, 16], [47, 47]], "group_id": None,
                 "shape_type": "rectangle", "flags": {}}  # fmt: skip
        doc = {"version": "5.5.0", "flags": {}, "shapes": [shape], "imagePath": png.name,
               "imageData": None, "imageHeight": 64, "imageWidth": 64}  # fmt: skip
        png.with_suffix(".json").write_text(json.dumps(doc))
    masks = tmp_path / "masks"
    assert (
        doctor_main(
            ["masks", "--annotations", str(ws), "--out", str(masks), "--dataset-size", "200"]
        )
        == 0
    )
    assert f"{n} masks written, 0 skipped" in capsys.readouterr().out
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                     "--experiment", "spatial", "--md", "--md-per-class", "5", "--md-alpha", "0",
                     "--md-beta", "0.5", "--md-masks", str(masks), "--no-md-report",
                     "--initial-checkpoint", str(baseline_run / "last.pth.tar")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert f"foreground masks: {n} of 200" in capsys.readouterr().out
    row = _rows(tmp_path / "spatial" / "summary.csv")[0]
    assert float(row["train_md_spatial"]) > 0 and float(row["train_md_channel"]) == 0


def test_gradient_accumulation_run(cifar10_root, tmp_path):
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                     "--experiment", "accum", "--grad-accum-steps", "2", "-b", "10"])  # fmt: skip
    assert rc == 0
    ck = torch.load(tmp_path / "accum" / "last.pth.tar", weights_only=True)
    assert ck["num_updates"] == 10  # 200 images / batch 10 = 20 micro-batches = 10 optimizer steps


def test_val_interval_skips_evaluation_but_not_the_last_epoch(cifar10_root, tmp_path, capsys):
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "3", "--val-interval", "2",
                     "--output", str(tmp_path), "--experiment", "vi", "--checkpoint-hist", "2"])  # fmt: skip
    assert rc == 0
    rows = _rows(tmp_path / "vi" / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert [bool(r["eval_top1"]) for r in rows] == [False, True, True]  # epochs 2 and 3 (last)
    assert [r[0] for r in csv.reader(open(tmp_path / "vi" / "per_class_acc.csv"))][1:] == ["1", "2"]
    assert "the validation split is the test set" in capsys.readouterr().out


def test_md_run_under_bf16_autocast(baseline_run, cifar10_root, tmp_path):
    """accelerate's bf16 mixed precision with the double backward of the channel loss.

    A subprocess: accelerate keeps one precision per process (AcceleratorState is a singleton).
    """
    argv = TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                   "--experiment", "bf16", "--amp", "--amp-dtype", "bfloat16", "--md",
                   "--md-per-class", "5", "--no-md-report",
                   "--initial-checkpoint", str(baseline_run / "last.pth.tar")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, str(ROOT / "train_md.py"), *argv], capture_output=True,
                       text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    row = _rows(tmp_path / "bf16" / "summary.csv")[0]
    assert float(row["train_md_channel"]) > 0 and float(row["train_skipped_steps"]) == 0
    assert yaml.safe_load((tmp_path / "bf16" / "args.yaml").read_text())["amp_dtype"] == "bfloat16"


def _spy_images(monkeypatch):
    """Record the (eval-transformed) images the diagnosis and the first evaluation iterate over."""
    import hashlib

    import md_plugin.doctor as doctor_pkg
    from md_plugin.train import diagnose_phase, epochs

    seen = {"diag": [], "val": []}
    real_diag, real_eval = doctor_pkg.diagnose, diagnose_phase.evaluate

    def key(x):
        return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()

    def spy_diag(model, loader, *a, **k):
        batches = list(loader)
        seen["diag"] += [key(x) for b in batches for x in b[0]]
        return real_diag(model, batches, *a, **k)

    def spy_eval(model, loader, *a, **k):
        if not seen["val"]:  # the first evaluation is on the validation (= held-out) split
            seen["val"] += [key(x) for b in loader for x in b[0]]
        return real_eval(model, loader, *a, **k)

    monkeypatch.setattr(doctor_pkg, "diagnose", spy_diag)
    monkeypatch.setattr(diagnose_phase, "evaluate", spy_eval)  # the evaluation before treatment
    monkeypatch.setattr(epochs, "evaluate", spy_eval)
    return seen


def test_diagnosis_never_uses_held_out_images(baseline_run, cifar10_root, tmp_path, monkeypatch):
    """With --val-from-train, the diagnosis iterates over exactly the training images that are
    not held out: every kept image once, no held-out image (compared image by image)."""
    seen = _spy_images(monkeypatch)
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                     "--experiment", "held", "--val-from-train", "30", "--md", "--md-alpha", "0.1",
                     "--md-per-class", "5", "--no-md-report", "--sampler-epoch-length", "40",
                     "--initial-checkpoint", str(baseline_run / "last.pth.tar")])  # fmt: skip
    assert rc == 0
    diag, val = seen["diag"], seen["val"]
    assert len(val) == 30 and len(set(val)) == 30  # the hold-out, all distinct images
    assert len(diag) == 200 - 30 and len(set(diag)) == 170  # each kept image exactly once
    assert not set(diag) & set(val)
    held = json.loads((tmp_path / "held" / "held_out.json").read_text())
    d = Diagnosis.load(tmp_path / "held" / "diagnosis.safetensors")
    assert d.options["images_seen"] == 170 and held["held_out"] == 30


def test_held_out_images_cannot_reach_the_diagnosis_through_another_split(
    baseline_run, cifar10_root, tmp_path, capsys
):
    """'training' is the full CIFAR training set to timm, hold-out included: refused."""
    rc = cli(TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path),
                     "--val-from-train", "30", "--md", "--md-diagnosis-split", "training",
                     "--initial-checkpoint", str(baseline_run / "last.pth.tar")])  # fmt: skip
    assert rc == 2
    assert "--val-from-train" in capsys.readouterr().err
    assert not (tmp_path / "diagnosis.safetensors").exists()
