"""train_md.py with --class-map, --class-cap and --val-from-train (held-out selection, test once)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from md_plugin.train.main import cli

TINY = ["--model", "resnet20_cifar", "--dataset", "torch/cifar10", "-b", "8", "--lr", "0.05",
        "--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0",
        "--no-progress", "--log-interval", "0", "--seed", "0", "--crop-padding", "2",
        "--color-jitter", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def subset_run(cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("subset_runs")
    cmap = out / "three.txt"
    cmap.write_text("bird\ncat\n0\n")  # bird -> 0, cat -> 1, airplane (source index 0) -> 2
    argv = TINY + ["--data-dir", str(cifar10_root), "--epochs", "2", "--output", str(out),
                   "--experiment", "sub", "--class-map", str(cmap), "--class-cap", "2=10",
                   "--val-from-train", "0.2", "--data-seed", "3"]  # fmt: skip
    assert cli(argv) == 0
    return out / "sub", argv


def test_class_map_cap_and_holdout_through_the_trainer(subset_run, caplog):
    run, _ = subset_run
    counts = json.loads((run / "train_counts.json").read_text())
    # fixture: 20 train images per class; cap airplane to 10; hold out 20% per class
    assert counts == {"counts": [16, 16, 8], "classes": ["bird", "cat", "airplane"]}
    held = json.loads((run / "held_out.json").read_text())
    assert held["per_class"] == [4, 4, 2] and held["held_out"] == 10 and held["seed"] == 3
    with open(run / "per_class_acc.csv", newline="") as f:
        assert next(csv.reader(f)) == ["epoch", "bird", "cat", "airplane"]
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["class_cap"] == ["2=10"] and args["val_from_train"] == 0.2
    assert args["data_seed"] == 3 and args["class_map"].endswith("three.txt")


def test_test_set_read_once_with_the_held_out_best(subset_run):
    run, _ = subset_run
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    top1 = [float(r["eval_top1"]) for r in rows]
    best_epoch = top1.index(max(top1))  # the first epoch reaching the best held-out top-1
    res = json.loads((run / "test_results.json").read_text())
    assert res["checkpoint"] == "model_best" and res["epoch"] == best_epoch
    assert res["images"] == 30 and res["test_split"] == "validation"  # 10 test images x 3 classes
    assert res["classes"] == ["bird", "cat", "airplane"] and len(res["per_class"]) == 3


def test_args_yaml_rebuilds_the_same_split(subset_run, tmp_path):
    """Reloading args.yaml repeats the run with the same held-out images."""
    run, _ = subset_run
    argv = ["-c", str(run / "args.yaml"), "--output", str(tmp_path), "--experiment", "again",
            "--epochs", "1"]  # fmt: skip
    assert cli(argv) == 0
    a = json.loads((run / "held_out.json").read_text())
    b = json.loads((tmp_path / "again" / "held_out.json").read_text())
    assert a["source_indices"] == b["source_indices"]


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--val-from-train", "1.5"], "argument --val-from-train: expected an image count"),
        (["--val-from-train", "5000"], "cannot hold out 5000"),
        (["--class-map", "missing.txt"], "class map file not found"),
        (["--class-cap", "cat=3"], "--class-cap expects N (every class) or CLASS=N"),
        (["--class-cap", "10=3"], "class 10 is out of range"),
        (["--val-from-train", "10", "--md-masks", "m/"], "cannot be combined"),
    ],
)
def test_subset_errors_are_one_line(cifar10_root, tmp_path, capsys, extra, msg):
    argv = TINY + ["--data-dir", str(cifar10_root), "--epochs", "1", "--output", str(tmp_path)]
    assert cli(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not any(tmp_path.iterdir())  # nothing written
