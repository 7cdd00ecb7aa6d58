"""Two-process worker for tests/test_multiprocess.py, and its single-process reference.

Run by the test as::

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 \
        tests/mp_worker.py OUT_DIR

Each rank diagnoses its own shard of a small image set (``shard_dataset``: every image on exactly
one rank), checks that all ranks hold the same diagnosis, then runs ``STEPS`` Model Doctor
treatment steps under DDP, each rank on its own shard of the global batch, and rank 0 saves the
diagnosis and the final parameters; then the same treatment again from the initial weights with
lazy regularisation (``ModelDoctor(every=EVERY)``, decided from the step index on each rank
without communication). :func:`reference_run` does the same in one process: one
diagnosis over all images, and per step the loss ``sum over shards of (CE + MD) / WORLD``, whose
gradient is what DDP's gradient averaging computes. The model has no BatchNorm, so no
statistic couples the samples and the two runs agree to rounding error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from md_plugin.doctor import diagnose
from md_plugin.doctor.diagnosis import shard_dataset
from md_plugin.doctor.treatment import ModelDoctor

WORLD = 2
NUM_CLASSES = 4
INPUT_SIZE = (3, 8, 8)
N_DIAG = 22  # not a multiple of WORLD * DIAG_BATCH: the shards have different lengths
DIAG_BATCH = 4
PER_CLASS = 3
SHARD_BATCH = 3
STEPS = 3
ALPHA = 0.5
LR = 0.1
EVERY = 2  # the lazy run: the terms on steps 0 and 2 (weight 2), none on step 1


class TinyNet(nn.Module):
    """Two convolutions and a linear head, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def make_model() -> TinyNet:
    """Seeded init; the head bias is centred so that predictions spread over the classes."""
    torch.manual_seed(0)
    model = TinyNet()
    probe = torch.randn(64, *INPUT_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.fc.bias -= model(probe).mean(0)
    return model


def diag_dataset(model: nn.Module) -> TensorDataset:
    """Random images labelled with the model's own predictions: every one is 'correct'."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_DIAG, *INPUT_SIZE, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return TensorDataset(x, y)


def shard_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s part of the global batch of ``step``."""
    g = torch.Generator().manual_seed(1000 + step * WORLD + rank)
    x = torch.randn(SHARD_BATCH, *INPUT_SIZE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (SHARD_BATCH,), generator=g)
    return x, y


def _diagnose(model, dataset, accelerator=None, world=1, rank=0):
    loader = DataLoader(shard_dataset(dataset, world, rank), batch_size=DIAG_BATCH)
    return diagnose(
        model, loader, "last_conv", NUM_CLASSES, per_class=PER_CLASS,
        accelerator=accelerator, input_size=INPUT_SIZE,
    )  # fmt: skip


def reference_run(every: int = 1):
    """Single process: (diagnosis, final state_dict) over the same global batches.

    With ``every > 1`` the Model Doctor term is written out by hand: ``every * alpha`` on the
    steps ``step % every == 0``, nothing on the others.
    """
    model = make_model()
    diag = _diagnose(model, diag_dataset(model))
    doctor = ModelDoctor(model, diag, alpha=ALPHA * every, input_size=INPUT_SIZE)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        total = torch.zeros(())
        for rank in range(WORLD):
            x, y = shard_batch(step, rank)
            logits = model(x)
            md, _ = doctor.loss(logits, y)
            if step % every:
                md = torch.zeros(())
            total = total + F.cross_entropy(logits, y) + md
        (total / WORLD).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    doctor.remove()
    return diag, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_on_all_ranks(acc, t: torch.Tensor) -> bool:
    g = acc.gather(t.detach().float().reshape(1, -1).contiguous())
    return bool(all(torch.equal(g[0], g[i]) for i in range(1, g.shape[0])))


def worker(out_dir: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator()
    assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type
    assert acc.num_processes == WORLD, acc.num_processes
    model = make_model()
    diag = _diagnose(model, diag_dataset(model), acc, acc.num_processes, acc.process_index)
    for name, ld in diag.layers.items():
        assert _same_on_all_ranks(acc, ld.masks), f"masks of {name} differ between ranks"
        assert _same_on_all_ranks(acc, ld.scores), f"scores of {name} differ between ranks"
    assert _same_on_all_ranks(acc, diag.counts), "image counts differ between ranks"

    for every, fname in ((1, "params.pt"), (EVERY, f"params_every{EVERY}.pt")):
        if every > 1:
            model = make_model()
        doctor = ModelDoctor(model, diag, alpha=ALPHA, input_size=INPUT_SIZE, every=every)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        ddp_model, opt = acc.prepare(model, opt)
        for step in range(STEPS):
            x, y = shard_batch(step, acc.process_index)
            due = doctor.begin_step(step) if every > 1 else True
            logits = ddp_model(x.to(acc.device))
            loss = F.cross_entropy(logits, y.to(acc.device))
            if due:
                loss = loss + doctor.loss(logits, y.to(acc.device))[0]
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        flat = torch.cat([p.detach().flatten() for p in acc.unwrap_model(ddp_model).parameters()])
        assert _same_on_all_ranks(acc, flat), "parameters differ between ranks after treatment"
        if acc.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            diag.save(out_dir / "diagnosis.safetensors")
            sd = acc.unwrap_model(ddp_model).state_dict()
            torch.save({k: v.detach().cpu() for k, v in sd.items()}, out_dir / fname)
            (out_dir / "distributed_type.txt").write_text(str(acc.distributed_type))
        acc.wait_for_everyone()
        doctor.remove()
    acc.end_training()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
