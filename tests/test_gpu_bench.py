"""benchmarks/gpu.sh: its CPU dry run goes through every stage a GPU run has (issue 14).

The dry run uses the same scripts with tiny sizes on CPU: the treatment benchmark in fp32, bf16
and fp16 (GradScaler, scaled cotangents) with the naive reference and --md-every, the diagnosis
benchmark in the three precisions, and a 2-process DDP step over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.sh"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _result(path: Path) -> dict:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, path.read_text()[-2000:]
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.slow
def test_gpu_benchmark_dry_run_covers_every_stage(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    treat = _result(tmp_path / "bench_treatment.txt")
    rows = treat["results"]["resnet20_cifar"]
    assert [row["precision"] for row in rows] == ["fp32", "bf16", "fp16"]
    for row in rows:
        assert {"plain", "ours", "every_2"} <= set(row["time"])
        assert all(st["img_s"] > 0 and st["ratio"] > 0 for st in row["time"].values())
    fp32 = rows[0]
    assert {"naive", "batched"} <= set(fp32["time"])  # the references run in fp32
    assert fp32["check"]["ours_loss_rel"] < 1e-5 and fp32["check"]["ours_grad_rel"] < 1e-4

    diag = _result(tmp_path / "bench_diagnosis.txt")
    assert [row["precision"] for row in diag["results"]["resnet20_cifar"]] == [
        "fp32",
        "bf16",
        "fp16",
    ]

    reads = _result(tmp_path / "bench_reads.txt")
    assert {"reads", "device"} <= set(reads["time"])

    ddp = _result(tmp_path / "bench_ddp.txt")
    assert ddp["world"] == 2 and ddp["replicas_identical"] is True
    assert {"plain", "ours", "every_2"} <= set(ddp["results"]["resnet20_cifar"][0]["time"])

    summary = (tmp_path / "summary.txt").read_text()
    assert "RESULT" not in summary
    for title in ("fp16: time and peak-memory ratios", "average step time of --md-every k"):
        assert title in summary


def test_gpu_benchmark_refuses_unknown_options_and_a_machine_without_cuda(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: unknown option --bogus (use --dry-run, --out DIR)"
    )
    env = dict(_env(), CUDA_VISIBLE_DEVICES="")  # no GPU visible, whatever the machine has
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == "error: no CUDA device visible to torch (on CPU, use --dry-run)"
    assert not (tmp_path / "bench_treatment.txt").exists()
