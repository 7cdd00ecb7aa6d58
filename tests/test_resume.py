"""Interrupted training resumes to exactly the uninterrupted result (issue 2).

Every run is a real ``python train_md.py`` subprocess on a tiny CIFAR-10 folder (40 train / 20
test images, batch 8: 5 steps per epoch). Kills are timed by polling the files and log lines the
run writes, never by sleeping a guessed time.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from md_plugin.train.checkpoint import atomic_save, load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _cmd(data: Path, out: Path, exp: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "train_md.py"), "--model", "resnet20_cifar",
        "--dataset", "torch/cifar10", "--data-dir", str(data), "-b", "8",
        "--epochs", str(EPOCHS), "--lr", "0.02", "--sched", "cosine", "--warmup-epochs", "0",
        "--smoothing", "0", "--workers", "0", "--no-progress", "--output", str(out),
        "--experiment", exp, "--seed", "0", "--log-interval", "1", *extra,
    ]  # fmt: skip


MD = ("--md", "--md-baseline-epochs", "1", "--md-per-class", "2", "--md-alpha", "0.1",
      "--no-md-report")  # fmt: skip


def _run(cmd: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(run_dir / "last.pth.tar")["state_dict"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ in {len(diff)} tensors, e.g. {diff[:3]}"
    ra, rb = _rows(a), _rows(b)
    assert [r["epoch"] for r in rb] == [str(e) for e in range(EPOCHS)]
    assert ra == rb  # every logged number, epoch by epoch, including the interrupted epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from md_plugin.data.fixtures import write_cifar

    root = tmp_path_factory.mktemp("cifar_tiny")
    write_cifar(root, "cifar10", train_per_class=4, test_per_class=2)
    return root


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(data, out) -> Path:
    """The uninterrupted 3-epoch run without Model Doctor."""
    _run(_cmd(data, out, "ref"))
    return out / "ref"


def _kill_after_first_epoch(cmd: list[str], ckpt: Path) -> dict:
    """Start ``cmd``, SIGKILL it as soon as ``ckpt`` exists (end of epoch 0); its checkpoint."""
    with open(ckpt.parent.parent / f"{ckpt.parent.name}.log", "w") as log:
        p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not ckpt.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run ended by itself (exit {p.returncode})"
    ck = load_checkpoint_file(ckpt)  # the atomic save never leaves a torn last.pth.tar
    assert ck["epoch"] < EPOCHS - 1, "killed too late: nothing left to resume"
    assert not ck.get("partial")
    return ck


@pytest.mark.parametrize("md", [False, True], ids=["plain", "md"])
def test_sigkill_after_an_epoch_then_resume_matches_uninterrupted(data, out, reference, md):
    extra = MD if md else ()
    ref = reference if not md else out / "ref_md"
    if md:
        _run(_cmd(data, out, "ref_md", *extra))
    run = out / f"killed_{'md' if md else 'plain'}"
    ck = _kill_after_first_epoch(_cmd(data, out, run.name, *extra), run / "last.pth.tar")
    assert [int(r["epoch"]) for r in _rows(run)] == list(range(ck["epoch"] + 1))

    r = _run(_cmd(data, out, run.name, *extra, "--resume", str(run / "last.pth.tar")))
    assert f"resumed from {run / 'last.pth.tar'}: epoch {ck['epoch'] + 1}" in r.stdout
    if md:  # the resumed run reuses the saved diagnosis and skips the baseline phase
        assert "== baseline" not in r.stdout
        from md_plugin.doctor import Diagnosis

        a = Diagnosis.load(ref / "diagnosis.safetensors")
        b = Diagnosis.load(run / "diagnosis.safetensors")
        for name, ld in a.layers.items():
            assert torch.equal(ld.masks, b.layers[name].masks)
    _assert_same_run(ref, run)


def test_md_every_resume_mid_cycle_matches_uninterrupted(data, out):
    """--md-every 3: killed after epoch 0 (5 updates: mid-cycle), resumed = uninterrupted run.

    The phase of the cycle comes from the checkpoint's update counter, so the resumed run
    penalises exactly the steps the uninterrupted one did."""
    extra = (*MD, "--md-every", "3")
    ref = out / "ref_md_every"
    _run(_cmd(data, out, ref.name, *extra))
    run = out / "killed_md_every"
    ck = _kill_after_first_epoch(_cmd(data, out, run.name, *extra), run / "last.pth.tar")
    assert ck["num_updates"] % 3 != 0, ck["num_updates"]  # the kill landed inside a cycle
    _run(_cmd(data, out, run.name, *extra, "--resume", str(run / "last.pth.tar")))
    _assert_same_run(ref, run)
    # and the lazy run is not the per-step one (the comparison above is not vacuous)
    if not (out / "ref_md").exists():
        _run(_cmd(data, out, "ref_md", *MD))
    wa, wb = _weights(ref), _weights(out / "ref_md")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_partial_checkpoint_and_resume_is_exact(data, out, reference, sig):
    run = out / f"signal_{sig.name}"
    stderr_path = out / f"{run.name}.stderr"
    with open(stderr_path, "w") as err:
        p = subprocess.Popen(
            _cmd(data, out, run.name), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
            stderr=err, text=True,
        )  # fmt: skip
        sent = False
        for line in p.stdout:  # "Train: <epoch> [<step>/<steps>] ..." after every step
            if not sent and line.startswith("Train: 1 [1/"):
                p.send_signal(sig)
                sent = True
        p.wait(timeout=120)
    stderr = stderr_path.read_text()
    assert sent
    assert p.returncode == 2, stderr
    assert "Traceback" not in stderr
    errors = [ln for ln in stderr.splitlines() if ln.strip()]
    assert errors == [
        "error: interrupted: resumable checkpoint saved, continue with the same command plus "
        f"--resume {run}"
    ]
    ck = load_checkpoint_file(run / "last.pth.tar")
    assert ck["epoch"] == 1 and 0 < ck["partial_step"] < 5, (ck["epoch"], ck["partial_step"])
    assert [r["epoch"] for r in _rows(run)] == ["0"]

    r = _run(_cmd(data, out, run.name, "--resume", str(run / "last.pth.tar")))
    assert f"epoch 1, step {ck['partial_step']}" in r.stdout
    _assert_same_run(reference, run)


def test_failure_inside_a_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """An exception (e.g. KeyboardInterrupt) halfway through torch.save: old file intact."""
    path = tmp_path / "last.pth.tar"
    atomic_save({"epoch": 1, "w": torch.arange(10)}, path)
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")  # bytes reach the temp file, then the "signal"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2, "w": torch.zeros(10)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_checkpoint_file(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]  # temp file removed


_WRITER = """
import sys, torch
from md_plugin.train.checkpoint import atomic_save
big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: each save takes a while
for version in range(1_000_000):
    atomic_save({"version": version, "big": big + version}, sys.argv[1])
"""


def test_sigkill_during_a_checkpoint_write_keeps_a_complete_file(tmp_path):
    """SIGKILL while the temp file is being written: last.pth.tar is a complete older save."""
    path = tmp_path / "last.pth.tar"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        # wait for a finished save, then for the next one to be in flight
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        while not list(tmp_path.glob(".last.pth.tar.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        in_flight = list(tmp_path.glob(".last.pth.tar.*.tmp"))
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert in_flight, "never saw a save in flight"
    ck = load_checkpoint_file(path)
    assert torch.equal(ck["big"], torch.arange(4_000_000, dtype=torch.float32) + ck["version"])
