"""Host reads per training step (issue 14): the logged loss sums stay on the device.

A GPU stalls on every ``.item()`` / ``float(t)`` / ``bool(t)``: the trainer used to read the loss,
the CE and each Model Doctor part every step. Now only the two finite checks that decide whether
to apply the step read the device per step; the sums are read once per epoch, and equal the
Python-float accumulation exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from md_plugin.doctor.treatment import ModelDoctor
from md_plugin.train.args import parse_args
from md_plugin.train.engine import RunningSums, TrainState, train_one_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mp_worker as w  # noqa: E402

STEPS = 6


class _CountReads:
    """Counts Tensor -> Python reads (item, tolist, float, int, bool) while active."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                self.n += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_running_sums_equal_python_float_accumulation():
    g = torch.Generator().manual_seed(0)
    vals = [torch.rand((), generator=g) * 10 for _ in range(50)]
    ref = 0.25
    rs = RunningSums({"loss": 0.25, "ce": 0.0})
    for i, v in enumerate(vals):
        ref += v.item() * (i + 1)
        rs.add(i + 1, {"loss": v})
    got = rs.read()
    assert got["loss"] == ref and got["ce"] == 0.0  # bit for bit, not approximately


def test_train_steps_read_the_device_twice_per_step_and_log_exact_sums(monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator()
    model = w.make_model()
    diag = w._diagnose(model, w.diag_dataset(model))
    md = ModelDoctor(model, diag, alpha=w.ALPHA, input_size=w.INPUT_SIZE)
    batches = [w.shard_batch(s, 0) for s in range(STEPS)]
    # the expected epoch means, by hand, on a copy of the model
    ref_model = w.make_model()
    ref_md = ModelDoctor(ref_model, diag, alpha=w.ALPHA, input_size=w.INPUT_SIZE)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=w.LR)
    tot = {"loss": 0.0, "ce": 0.0, "md_channel": 0.0}
    for x, y in batches:
        logits = ref_model(x)
        ce = F.cross_entropy(logits, y)
        md_loss, parts = ref_md.loss(logits, y)
        loss = ce + md_loss
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        bs = y.shape[0]
        tot["loss"] += loss.item() * bs
        tot["ce"] += ce.item() * bs
        tot["md_channel"] += float(parts["md_channel"]) * bs
    ref_md.remove()

    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    model, opt = acc.prepare(model, opt)
    args = parse_args(["--log-interval", "0", "--no-progress"])
    reads = _CountReads(monkeypatch)
    m = train_one_epoch(0, model, batches, opt, nn.CrossEntropyLoss(), acc, args, TrainState(),
                        doctor=md)  # fmt: skip
    n_reads = reads.n
    monkeypatch.undo()
    md.remove()
    n = sum(len(y) for _, y in batches)
    for k, v in tot.items():
        assert m[k] == v / n, k  # exactly the per-step Python-float accumulation
    # per step: the loss and gradient finite checks and ModelDoctor's label-range check; one
    # read of the sums at the end (before: 8 per step -- loss, ce, four parts, two checks)
    assert n_reads == 3 * STEPS + 1, n_reads
