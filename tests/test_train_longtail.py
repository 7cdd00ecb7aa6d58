"""train_md.py on long-tailed CIFAR: counts logged, shot metrics, MD with every loss/sampler kind."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from md_plugin.data.fixtures import write_cifar
from md_plugin.train.main import cli

TINY = ["--model", "resnet20_cifar", "-b", "16", "--lr", "0.05", "--sched", "cosine",
        "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0", "--no-progress",
        "--log-interval", "0", "--seed", "0", "--color-jitter", "0", "--imb-ratio", "10"]  # fmt: skip


@pytest.fixture(scope="module")
def lt_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt")
    write_cifar(root, "cifar10", train_per_class=40, test_per_class=6)
    return root


@pytest.fixture(scope="module")
def lt_baseline(lt_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ltruns")
    assert cli(TINY + ["--dataset", "cifar10_lt", "--data-dir", str(lt_root), "--epochs", "1",
                       "--output", str(out), "--experiment", "base"]) == 0  # fmt: skip
    return out / "base" / "last.pth.tar"


def test_lt_run_logs_counts_and_shot_accuracy(lt_root, lt_baseline, capsys):
    # ratio 10 over n_max=40: n_i = int(40 * 0.1 ** (i / 9))
    expected = [int(40 * 0.1 ** (i / 9)) for i in range(10)]
    with open(lt_baseline.parent / "summary.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert {"eval_many", "eval_medium", "eval_few"} <= set(row)
    import json

    counts = json.loads((lt_baseline.parent / "train_counts.json").read_text())["counts"]
    assert counts == expected and sum(counts) == sum(expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--loss", "ldam", "--drw-epoch", "0", "--sampler", "class_balanced"],
        ["--loss", "balanced_softmax", "--sampler", "sqrt"],
        ["--loss", "focal", "--sampler", "progressive"],
        ["--loss", "cb_ce"],
    ],
    ids=["ldam-drw+cbs", "bs+sqrt", "focal+progressive", "cb_ce"],
)
def test_md_with_long_tail_losses_and_samplers(lt_root, lt_baseline, tmp_path, extra, capsys):
    rc = cli(TINY + ["--dataset", "cifar10_lt", "--data-dir", str(lt_root), "--epochs", "1",
                     "--output", str(tmp_path), "--experiment", "md", "--md", "--md-per-class", "3",
                     "--initial-checkpoint", str(lt_baseline), "--no-md-report"] + extra)  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    with open(tmp_path / "md" / "summary.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert np.isfinite(float(row["train_loss"])) and float(row["train_md_channel"]) >= 0


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--dataset", "cifar100_lt"], "cifar-100-python"),
        (
            [
                "--dataset",
                "cifar10_lt",
                "--sampler",
                "class_balanced",
                "--sampler-epoch-length",
                "8",
            ],
            "larger than the sampler's epoch length",
        ),
        (["--dataset", "cifar10_lt", "--loss", "nope"], "nope"),
    ],
)
def test_lt_bad_input_is_one_line(lt_root, tmp_path, capsys, extra, msg):
    assert (
        cli(TINY + ["--data-dir", str(lt_root), "--epochs", "1", "--output", str(tmp_path)] + extra)
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
