"""Two CPU processes (gloo): diagnosis and treatment agree with one process; train_md.py runs.

Launchers, from docs/timm-accelerate-notes §4: ``accelerate launch --cpu --num_processes 2``
silently starts ONE process, so we use ``ACCELERATE_USE_CPU=1 torchrun --standalone`` (the
rendezvous binds an OS-chosen free port, never the fixed 29500) and
``accelerate launch --multi_gpu ... --main_process_port <free port>`` (train_md.py asks for the
CPU itself when there is no GPU; other scripts need ``ACCELERATE_USE_CPU=1``).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    cmd: list[str], timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = _env() if env is None else env
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_process_diagnosis_and_treatment_match_single_process(tmp_path):
    """MULTI_CPU diagnosis = single-process diagnosis; DDP treatment = sum of shard losses/2."""
    sys.path.insert(0, str(TESTS))
    import mp_worker

    _run(_torchrun() + [str(TESTS / "mp_worker.py"), str(tmp_path)])
    assert (tmp_path / "distributed_type.txt").read_text() == "DistributedType.MULTI_CPU"

    from md_plugin.doctor import Diagnosis

    ref_diag, ref_params = mp_worker.reference_run()
    mp_diag = Diagnosis.load(tmp_path / "diagnosis.safetensors")
    # the merged per-rank top-N buffers select the same images as one pass over all images
    assert torch.equal(mp_diag.counts, ref_diag.counts)
    assert int(ref_diag.counts.sum()) > 0
    assert mp_diag.options["images_seen"] == mp_worker.N_DIAG
    for name, ld in ref_diag.layers.items():
        assert torch.equal(mp_diag.layers[name].masks, ld.masks), name
        torch.testing.assert_close(mp_diag.layers[name].scores, ld.scores, rtol=1e-5, atol=1e-6)

    mp_params = torch.load(tmp_path / "params.pt", weights_only=True)
    init = mp_worker.make_model().state_dict()
    moved = max((ref_params[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, "the treatment steps did not change the weights: the test is vacuous"
    for k, v in ref_params.items():
        torch.testing.assert_close(mp_params[k], v, rtol=0, atol=1e-5, msg=k)

    # lazy regularisation under DDP: each rank decides from the step index alone, the ranks
    # stay in lock step (the worker asserts equal parameters) and match the hand-written
    # single-process reference (weight EVERY * alpha on steps 0 and 2, no term on step 1)
    _, lazy_ref = mp_worker.reference_run(every=mp_worker.EVERY)
    lazy_mp = torch.load(tmp_path / f"params_every{mp_worker.EVERY}.pt", weights_only=True)
    differs = max((lazy_ref[k] - ref_params[k]).abs().max().item() for k in init)
    assert differs > 1e-4, "lazy and per-step treatment gave the same weights: vacuous"
    for k, v in lazy_ref.items():
        torch.testing.assert_close(lazy_mp[k], v, rtol=0, atol=1e-5, msg=k)


def test_train_md_two_processes_end_to_end(tmp_path):
    """train_md.py --md under `accelerate launch --multi_gpu` (2 CPU processes): one run, one
    summary. Without ACCELERATE_USE_CPU=1 (issue 19 item 5): on a machine without GPUs
    train_md.py asks accelerate for the CPU itself, where accelerate alone would start two
    separate single-process runs."""
    from md_plugin.data.fixtures import write_cifar

    data = tmp_path / "data"
    write_cifar(data, "cifar10", train_per_class=4, test_per_class=2)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(REPO / "train_md.py"), "--model", "resnet20_cifar", "--dataset", "torch/cifar10",
        "--data-dir", str(data), "-b", "8", "--epochs", "1", "--lr", "0.02", "--sched", "cosine",
        "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0", "--no-progress",
        "--output", str(tmp_path / "out"), "--experiment", "mp", "--seed", "0",
        "--log-interval", "0", "--md", "--md-baseline-epochs", "1", "--md-per-class", "2",
        "--md-alpha", "0.1", "--no-md-report",
    ]  # fmt: skip
    env = _env()
    if not torch.cuda.is_available():
        del env["ACCELERATE_USE_CPU"]
    r = _run(cmd, env=env)
    out = tmp_path / "out" / "mp"
    assert "batch 8 x 2 processes" in r.stdout  # really two processes, not one
    assert r.stdout.count("Epoch 1/1 |") == 2  # baseline + treatment, logged by rank 0 only
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0"]
    assert float(rows[0]["train_md_channel"]) > 0  # the Model Doctor term was active
    for name in ("last.pth.tar", "diagnosis.safetensors", "args.yaml", "baseline/last.pth.tar"):
        assert (out / name).is_file(), name
    ck = torch.load(out / "last.pth.tar", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0 and not ck["partial_step"]
    assert "Traceback" not in r.stderr


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers (killing only the launcher would orphan them)."""
    for child in _children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children (Linux /proc)."""
    for pid in _children(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_signal_to_one_rank_stops_all_ranks_and_resume_is_exact(tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step (no collective hang),
    rank 0 writes one partial checkpoint, and the resumed 2-process run ends with the weights
    and summary of an uninterrupted 2-process run."""
    from md_plugin.data.fixtures import write_cifar
    from md_plugin.train.checkpoint import load_checkpoint_file

    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc to find the rank-1 process")
    data = tmp_path / "data"
    write_cifar(data, "cifar10", train_per_class=8, test_per_class=2)

    def cmd(exp: str, *extra: str) -> list[str]:
        return _torchrun() + [
            str(REPO / "train_md.py"), "--model", "resnet20_cifar", "--dataset", "torch/cifar10",
            "--data-dir", str(data), "-b", "8", "--epochs", "3", "--lr", "0.02",
            "--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0",
            "--no-progress", "--output", str(tmp_path / "out"), "--experiment", exp,
            "--seed", "0", "--log-interval", "1", *extra,
        ]  # fmt: skip

    _run(cmd("ref"))
    run = tmp_path / "out" / "int"
    p = subprocess.Popen(cmd("int"), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sent, lines = False, []
    # a hang (ranks out of step) must fail the test, not block it
    watchdog = threading.Timer(180, _kill_tree, (p.pid,))
    watchdog.start()
    try:
        for line in p.stdout:  # rank 0 logs "Train: <epoch> [<step>/5]" after every step
            lines.append(line)
            if not sent and line.startswith("Train: 1 [0/"):
                pid = _rank_pid(p.pid, 1)
                assert pid is not None, "rank 1 not found"
                os.kill(pid, signal.SIGTERM)
                sent = True
        p.wait(timeout=120)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            _kill_tree(p.pid)
            p.wait(timeout=30)
    text = "".join(lines)
    assert sent and p.returncode != 0, text[-3000:]
    assert text.count("error: interrupted: resumable checkpoint saved") == 2, text[-3000:]
    ck = load_checkpoint_file(run / "last.pth.tar")
    assert ck["epoch"] == 1 and 0 < ck["partial_step"] <= 5

    _run(cmd("int", "--resume", str(run / "last.pth.tar")))
    a = load_checkpoint_file(tmp_path / "out" / "ref" / "last.pth.tar")["state_dict"]
    b = load_checkpoint_file(run / "last.pth.tar")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "out" / "ref" / "summary.csv", newline="") as f:
        ref_rows = list(csv.DictReader(f))
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and rows == ref_rows
