"""Numeric faults, gradient clipping with the Model Doctor terms, and run-to-run determinism.

Faults are injected by wrapping the classification loss that ``main`` builds (in process, a few
seconds per run on a 40-image CIFAR-10 folder); determinism is checked across two separate
processes with different ``PYTHONHASHSEED`` values.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from md_plugin.losses import classification
from md_plugin.train.args import parse_args
from md_plugin.train.checkpoint import load_checkpoint_file
from md_plugin.train.engine import TrainingAborted, TrainState, _bad_step, train_one_epoch
from md_plugin.train.main import cli, main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from md_plugin.data.fixtures import write_cifar

    root = tmp_path_factory.mktemp("cifar_tiny")
    write_cifar(root, "cifar10", train_per_class=4, test_per_class=2)
    return root


def _argv(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "--model", "resnet20_cifar", "--dataset", "torch/cifar10", "--data-dir", str(data),
        "-b", "8", "--epochs", str(epochs), "--lr", "0.02", "--sched", "cosine",
        "--warmup-epochs", "0", "--smoothing", "0", "--workers", "0", "--no-progress",
        "--output", str(out), "--experiment", "run", "--seed", "0", "--log-interval", "0",
        *extra,
    ]  # fmt: skip


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


class _NaNGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class _Faulty(nn.Module):
    """Wraps the real criterion; calls (= training steps) in ``bad`` get a non-finite loss or
    a non-finite gradient."""

    def __init__(self, inner: nn.Module, bad, kind: str):
        super().__init__()
        self.inner, self.bad, self.kind, self.calls = inner, bad, kind, 0

    def forward(self, logits, target):
        i, self.calls = self.calls, self.calls + 1
        loss = self.inner(logits, target)
        if i in self.bad:
            return loss * float("inf") if self.kind == "loss" else _NaNGrad.apply(loss)
        return loss


def _inject(monkeypatch, bad, kind: str) -> None:
    from md_plugin.train import recipe

    real = classification.create_loss
    faulty = lambda *a, **k: _Faulty(real(*a, **k), bad, kind)  # noqa: E731
    monkeypatch.setattr(classification, "create_loss", faulty)
    monkeypatch.setattr(recipe, "create_loss", faulty)  # what the trainer calls


def _finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v.float()).all() for v in sd.values())


@pytest.mark.parametrize(
    "kind, clip",
    [("loss", []), ("grad", []), ("grad", ["--clip-grad", "1.0"])],
    ids=["loss", "grad", "grad-clip-norm"],
)
def test_non_finite_steps_are_skipped_counted_and_logged(
    data, tmp_path, monkeypatch, capsys, kind, clip
):
    _inject(monkeypatch, bad={2, 3}, kind=kind)  # two in a row in epoch 0 (5 steps per epoch)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    res = main(parse_args(_argv(data, tmp_path, "--max-bad-steps", "3", *clip)))
    log = capsys.readouterr().out
    rows = _rows(Path(res["out_dir"]))
    assert [int(r["train_skipped_steps"]) for r in rows] == [2, 0]
    what = "loss=inf" if kind == "loss" else "non-finite gradient"
    assert f"epoch 0 step 2: {what}, step skipped (1 in a row)" in log
    assert f"epoch 0 step 3: {what}, step skipped (2 in a row)" in log
    assert "| skipped 2" in log
    ck = load_checkpoint_file(Path(res["out_dir"]) / "last.pth.tar")
    assert ck["num_updates"] == 10 - 2  # the skipped steps did not update
    assert _finite(ck["state_dict"])  # a NaN gradient never reached the weights
    # main() gives the process its own signal handlers back
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_consecutive_bad_steps_abort_with_causes_and_keep_last_good_checkpoint(
    data, tmp_path, monkeypatch, capsys
):
    _inject(monkeypatch, bad=set(range(6, 100)), kind="grad")  # epoch 1 goes bad from step 1
    code = cli(_argv(data, tmp_path, "--max-bad-steps", "3"))
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 3 consecutive non-finite steps")
    assert "learning rate too high (lr 0.02)" in lines[0]
    run = tmp_path / "run"
    assert f"The last good checkpoint is {run / 'last.pth.tar'} (epoch 0)." in lines[0]
    ck = load_checkpoint_file(run / "last.pth.tar")  # epoch 0's checkpoint, untouched
    assert ck["epoch"] == 0 and not ck["partial_step"] and _finite(ck["state_dict"])
    assert [r["epoch"] for r in _rows(run)] == ["0"]


@pytest.mark.parametrize("bad_steps", ["3", "30"])
def test_huge_lr_never_leaves_a_poisoned_checkpoint(data, tmp_path, capsys, bad_steps):
    """Issue 13 item 1: --lr 1e6 used to save NaN BatchNorm statistics as the "last good"
    checkpoint. Now every checkpoint on disk is finite (weights and buffers), and the abort names
    the checkpoint that exists, or says there is none."""
    argv = _argv(data, tmp_path, "--max-bad-steps", bad_steps, "--checkpoint-hist", "2")
    argv[argv.index("--lr") + 1] = "1e6"
    code = cli(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    run = tmp_path / "run"
    files = sorted(run.glob("*.pth.tar"))
    for f in files:
        ck = load_checkpoint_file(f)
        assert _finite(ck["state_dict"]), f  # BatchNorm running stats included
    if (run / "last.pth.tar").exists():
        ep = load_checkpoint_file(run / "last.pth.tar")["epoch"]
        assert f"The last good checkpoint is {run / 'last.pth.tar'} (epoch {ep})." in lines[0]
    else:
        assert lines[0].endswith("No checkpoint was written yet (nothing to resume).")


def test_abort_message_names_model_doctor_and_fp16_causes():
    args = argparse.Namespace(
        max_bad_steps=2, md=True, md_alpha=50.0, md_beta=0.0, lr=3.0, amp=True,
        amp_dtype="float16",
    )  # fmt: skip
    acc = argparse.Namespace(is_main_process=False)
    state = TrainState()
    _bad_step(state, args, 0, 0, "loss=nan", acc)
    with pytest.raises(TrainingAborted) as e:
        _bad_step(state, args, 0, 1, "loss=nan", acc)
    msg = str(e.value)
    assert "--md-alpha too high (50.0)" in msg
    assert "learning rate too high (lr 3.0)" in msg
    assert "fp16 overflow" in msg


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the gradient it is about to apply."""

    norms: list[float]
    max_abs: list[float]

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.max_abs.append(max(float(g.abs().max()) for g in grads))
        return super().step(closure)


def _grad_size(model, mode: str) -> float:
    """Total L2 norm (mode "norm") or largest magnitude (mode "value") of the gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if mode == "norm":
        size = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    else:
        size = max(float(g.abs().max()) for g in grads)
    model.zero_grad(set_to_none=True)
    return size


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_gradient_clipping_covers_the_model_doctor_terms(mode):
    """--clip-grad bounds the gradient of CE + MD, even where the MD term alone exceeds it."""
    from accelerate import Accelerator

    sys.path.insert(0, str(TESTS))
    import mp_worker as w

    from md_plugin.doctor.treatment import ModelDoctor

    model = w.make_model()
    diag = w._diagnose(model, w.diag_dataset(model))
    doctor = ModelDoctor(model, diag, alpha=200.0, input_size=w.INPUT_SIZE)
    batches = [w.shard_batch(s, 0) for s in range(3)]
    x, y = batches[0]
    logits = model(x)
    nn.functional.cross_entropy(logits, y).backward()
    ce_size = _grad_size(model, mode)
    logits = model(x)
    doctor.loss(logits, y)[0].backward()
    md_size = _grad_size(model, mode)
    clip = math.sqrt(ce_size * md_size)
    assert ce_size < clip < md_size  # clipping the CE gradient alone would not respect `clip`

    acc = Accelerator()
    opt = _RecordingSGD(model.parameters(), lr=0.01)
    opt.norms, opt.max_abs = [], []
    model, opt = acc.prepare(model, opt)
    args = parse_args(["--clip-grad", str(clip), "--clip-mode", mode, "--log-interval", "0",
                       "--no-progress"])  # fmt: skip
    loader = [(bx.to(acc.device), by.to(acc.device)) for bx, by in batches]
    crit = nn.CrossEntropyLoss()
    m = train_one_epoch(0, model, loader, opt, crit, acc, args, TrainState(), doctor=doctor)
    doctor.remove()
    assert m["md_channel"] > 0 and m["skipped_steps"] == 0
    inner = opt.optimizer
    assert len(inner.norms) == 3
    if mode == "norm":
        assert max(inner.norms) <= clip * (1 + 1e-5)
        assert inner.norms[0] == pytest.approx(clip, rel=1e-4)  # it was clipped, not small
    else:
        assert max(inner.max_abs) <= clip * (1 + 1e-6)
        assert inner.max_abs[0] == pytest.approx(clip, rel=1e-6)


def _run_md(data: Path, out: Path, exp: str, hashseed: str) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=hashseed)
    argv = _argv(data, out, "--md", "--md-baseline-epochs", "1", "--md-per-class", "2",
                 "--md-alpha", "0.1", "--no-md-report", epochs=2)  # fmt: skip
    argv[argv.index("--experiment") + 1] = exp
    r = subprocess.run([sys.executable, str(REPO / "train_md.py"), *argv], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return out / exp


@pytest.mark.slow
def test_same_seed_same_config_gives_identical_diagnosis_and_weights(data, tmp_path):
    from md_plugin.doctor import Diagnosis

    a = _run_md(data, tmp_path, "a", hashseed="1")
    b = _run_md(data, tmp_path, "b", hashseed="2")
    da = Diagnosis.load(a / "diagnosis.safetensors")
    db = Diagnosis.load(b / "diagnosis.safetensors")
    assert torch.equal(da.counts, db.counts) and int(da.counts.sum()) > 0
    for name, ld in da.layers.items():
        assert torch.equal(ld.masks, db.layers[name].masks)
        assert torch.equal(ld.scores, db.layers[name].scores)
    for sub in ("baseline", "."):
        wa = load_checkpoint_file(a / sub / "last.pth.tar")["state_dict"]
        wb = load_checkpoint_file(b / sub / "last.pth.tar")["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    assert _rows(a) == _rows(b)
