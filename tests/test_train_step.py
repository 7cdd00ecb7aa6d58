"""One training step for both loops (issue 20 item 3) and out of memory in a step (issue 19).

``ModelDoctorTask`` (timm's ``task(input, target)`` loop) and ``train_one_epoch``
(``train_md.py``) both run :func:`md_plugin.doctor.step.treatment_step`. Ground truth: the two
loops, built on the same tiny BN-free model, diagnosis and batches, end with the same parameters,
bit for bit, with lazy regularisation (``every=4``) and with soft (mixup-style) targets; the lazy
run really differs from the per-step one, so the comparison is not vacuous.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from timm.loss import SoftTargetCrossEntropy

from md_plugin import ModelDoctorTask
from md_plugin.doctor import ModelDoctor, dominant_label, loss_scale, treatment_step
from md_plugin.train.args import parse_args
from md_plugin.train.engine import StepOutOfMemory, TrainState, train_one_epoch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import mp_worker as w  # noqa: E402  (tiny BN-free net, its diagnosis, seeded batches)

ALPHA = 0.5
STEPS = 9  # every=4: the terms on steps 0, 4 and 8


@pytest.fixture(scope="module")
def diag():
    model = w.make_model()
    return w._diagnose(model, w.diag_dataset(model))


def _batches(n: int, soft: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded batches; ``soft``: each image mixed 0.7/0.3 with the next one, as mixup does."""
    out = []
    for s in range(n):
        x, y = w.shard_batch(s, 0)
        if soft:
            one = F.one_hot(y, w.NUM_CLASSES).float()
            x = 0.7 * x + 0.3 * x.roll(1, 0)
            y = 0.7 * one + 0.3 * one.roll(1, 0)
        out.append((x, y))
    return out


def _criterion(soft: bool) -> nn.Module:
    return SoftTargetCrossEntropy() if soft else nn.CrossEntropyLoss()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _task_path(diag, batches, every: int, soft: bool):
    """timm's loop: ``task(x, y)``, backward, step; the task counts its own steps."""
    model = w.make_model()
    task = ModelDoctorTask(
        model, diag, _criterion(soft), alpha=ALPHA, every=every, input_size=w.INPUT_SIZE,
        verbose=False,
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    due = []
    for x, y in batches:
        res = task(x, y)
        res["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        due.append("md_channel" in res)
    task.doctor.remove()
    return _params(model), due, task


def _trainer_path(diag, batches, every: int, soft: bool, num_updates: int = 0):
    acc = Accelerator()
    model = w.make_model()
    md = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE, every=every)
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    model, opt = acc.prepare(model, opt)
    args = parse_args(["--log-interval", "0", "--no-progress"])
    state = TrainState(num_updates=num_updates)
    m = train_one_epoch(0, model, batches, opt, _criterion(soft), acc, args, state, doctor=md)
    md.remove()
    return _params(acc.unwrap_model(model)), m, state


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft-targets"])
def test_task_and_trainer_give_the_same_parameters_with_every_4(diag, soft):
    batches = _batches(STEPS, soft)
    task_params, due, task = _task_path(diag, batches, 4, soft)
    trainer_params, m, state = _trainer_path(diag, batches, 4, soft)
    assert due == [s % 4 == 0 for s in range(STEPS)]
    assert task.steps == state.num_updates == STEPS
    assert m["md_channel"] > 0
    for a, b in zip(task_params, trainer_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # not vacuous: the per-step penalty ends elsewhere
    per_step, _, _ = _task_path(diag, batches, 1, soft)
    assert max((a - b).abs().max().item() for a, b in zip(task_params, per_step)) > 1e-4


def test_task_step_argument_and_saved_step_count_keep_the_lazy_phase(diag):
    """``step=`` overrides the task's count; the count survives get/load_task_state."""
    batches = _batches(3, False)
    _, _, task = _task_path(diag, batches, 4, False)
    state = task.get_task_state()
    assert state["md_steps"] == 3
    model = w.make_model()
    task2 = ModelDoctorTask(model, task.doctor.diagnosis, alpha=ALPHA, every=4, verbose=False)
    task2.load_task_state(state)
    x, y = batches[0]
    assert "md_channel" not in task2(x, y)  # step 3
    assert "md_channel" in task2(x, y)  # step 4
    assert "md_channel" in task2(x, y, step=8) and task2.steps == 5  # given: not counted
    assert "md_channel" not in task2(x, y, step=9)
    task2.eval()
    with torch.no_grad():
        assert set(task2(x, y)) == {"loss", "output", "task_loss"}
    assert task2.steps == 5  # evaluation forwards are no optimizer steps
    task2.doctor.remove()


def test_task_takes_loss_kind_and_monitor(diag):
    x, y = _batches(1, False)[0]
    model = w.make_model()
    mon = ModelDoctorTask(model, diag, alpha=0.0, monitor=True, input_size=w.INPUT_SIZE,
                          verbose=False)  # fmt: skip
    res = mon(x, y)
    assert res["md_channel"] > 0 and res["md_irr_share"] > 0
    assert torch.equal(res["loss"], res["task_loss"])  # measured, not trained on
    mon.doctor.remove()
    share = ModelDoctorTask(model, diag, alpha=ALPHA, loss_kind="share", input_size=w.INPUT_SIZE,
                            verbose=False)  # fmt: skip
    assert share.doctor.loss_kind == "share" and not share.doctor.confusing_term
    res = share(x, y)
    # one target layer: the channel term is the irrelevant share itself
    assert len(diag.layer_names) == 1
    torch.testing.assert_close(res["md_channel"], res["md_irr_share"])
    torch.testing.assert_close(res["loss"], res["task_loss"] + ALPHA * res["md_channel"])
    share.doctor.remove()


def test_soft_targets_reach_the_penalties_as_their_dominant_label(diag):
    """The shared step gives the doctor soft targets as they are; the penalties equal those of
    the argmax labels (the one dominant-label rule)."""
    x, y_soft = _batches(1, True)[0]
    assert torch.equal(dominant_label(y_soft), y_soft.argmax(1))
    model = w.make_model()
    md = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE)
    soft = treatment_step(model, nn.CrossEntropyLoss(), md, x, y_soft, step=0)
    hard = treatment_step(model, nn.CrossEntropyLoss(), md, x, y_soft.argmax(1), step=0)
    assert soft["md_channel"] > 0
    assert torch.equal(soft["md_channel"], hard["md_channel"])
    md.remove()


def test_loss_scale_reads_only_an_enabled_scaler():
    class Scaler:
        def __init__(self, on):
            self.on = on

        def is_enabled(self):
            return self.on

        def get_scale(self):
            return 1024.0

    class Native:  # timm's NativeScaler keeps the torch scaler in ._scaler
        _scaler = Scaler(True)

    assert loss_scale(None) == 1.0
    assert loss_scale(Scaler(False)) == 1.0
    assert loss_scale(Scaler(True)) == 1024.0
    assert loss_scale(Native()) == 1024.0


# ------------------------------------------------------------------------------------------
# out of memory in a training step: one line with the batch size and a hint (issue 19 item 8)
# ------------------------------------------------------------------------------------------
_OOM = [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"),
]


@pytest.mark.parametrize("error", _OOM, ids=["cuda", "cpu", "mps"])
def test_out_of_memory_in_a_step_is_one_line_with_the_batch_size(monkeypatch, error):
    def forward(self, x):
        raise error

    monkeypatch.setattr(w.TinyNet, "forward", forward)
    acc = Accelerator()
    model = w.TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    args = parse_args(["--log-interval", "0", "--no-progress", "--grad-accum-steps", "2"])
    with pytest.raises(StepOutOfMemory) as e:
        train_one_epoch(0, model, _batches(1, False), opt, nn.CrossEntropyLoss(), acc, args,
                        TrainState())  # fmt: skip
    msg = str(e.value)
    assert "\n" not in msg
    assert f"batch size {w.SHARD_BATCH} per process" in msg
    assert "--batch-size" in msg and "--grad-accum-steps 4" in msg


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    def forward(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(w.TinyNet, "forward", forward)
    model = w.TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    args = parse_args(["--log-interval", "0", "--no-progress"])
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_one_epoch(0, model, _batches(1, False), opt, nn.CrossEntropyLoss(), Accelerator(),
                        args, TrainState())  # fmt: skip


def test_train_md_out_of_memory_is_one_line(monkeypatch, tmp_path, capsys):
    """Through train_md.py: exit 2, one ``error:`` line naming the batch size, no traceback."""
    from md_plugin.data.fixtures import write_cifar
    from md_plugin.models.cifar_resnet import CifarResNet
    from md_plugin.train.main import cli

    write_cifar(tmp_path / "data", "cifar10", train_per_class=2, test_per_class=1)
    real = CifarResNet.forward

    def forward(self, x):
        if self.training:  # the training step, not the evaluation
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, x)

    monkeypatch.setattr(CifarResNet, "forward", forward)
    rc = cli([
        "--model", "resnet20_cifar", "--dataset", "torch/cifar10", "--data-dir",
        str(tmp_path / "data"), "-b", "6", "--epochs", "1", "--workers", "0", "--no-progress",
        "--log-interval", "0", "--output", str(tmp_path / "out"), "--experiment", "oom",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: out of memory in a training step at batch size 6")
    assert "Traceback" not in err
