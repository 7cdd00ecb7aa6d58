"""What the phases of one ``train_md.py`` run hand each other.

:class:`RunContext` is filled top to bottom by the phases :mod:`md_plugin.train.main` runs
(data, baseline, model and task, resume, diagnosis, epochs, report): a phase reads the fields the
earlier phases set and adds its own, so a new feature finds its inputs here instead of in long
argument lists.
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_text
from .checkpoint import CheckpointManager
from .engine import TrainState

__all__ = ["RunContext", "Summary", "atomic_text"]


def atomic_text(path: Path, text: str) -> None:
    """Write a text file like a checkpoint (unique temp name, fsync, rename; mode 0666 - umask):
    a kill never leaves half a file and two writers never share a temp file."""
    atomic_write_text(path, text)


class Summary:
    """summary.csv (timm's schema plus train_* extras), rewritten whole so resume stays exact."""

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None):
        self.path = path
        self.rows = list(rows or [])

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_text(self.path, buf.getvalue())


@dataclass
class RunContext:
    """The state of one run, grouped by the phase that sets it (``None`` until then)."""

    args: argparse.Namespace
    acc: Any  # accelerate.Accelerator
    nested: bool = False  # the baseline run inside a --md run: must not end the process group

    # build_data: untransformed datasets, labels, the output folder's path (not yet created)
    train_base: Any = None
    val_base: Any = None  # selects the best epoch: --val-split, or the --val-from-train hold-out
    test_base: Any = None  # with --val-from-train: the --val-split, evaluated once at the end
    data_info: dict[str, Any] = field(default_factory=dict)  # class map, caps, hold-out
    targets: list[int] = field(default_factory=list)
    num_classes: int = 0
    counts: list[int] = field(default_factory=list)  # training images per class
    class_names: list[str] = field(default_factory=list)
    val_is_test: bool = False  # torchvision CIFAR: the "validation" split is the test set
    out_dir: Path = Path()
    lock: Any = None  # md_plugin.rundir.RunDirLock held by the main process for the run
    phase_at_start: str | None = None  # run_state.json's phase when this process started
    finished: bool = False  # --resume of a run that already finished

    # build_model_and_task: model, transforms, loaders, optimizer, schedule, loss, EMA
    model: torch.nn.Module | None = None  # as prepared by accelerate (maybe DDP-wrapped)
    unwrapped: torch.nn.Module | None = None  # the bare model (hooks, state dicts)
    data_config: dict[str, Any] = field(default_factory=dict)
    eval_tf: Any = None
    sampler: Any = None
    generator: torch.Generator | None = None  # the RandomSampler's, reseeded every epoch
    train_loader: Any = None
    val_loader: Any = None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    num_epochs: int = 0
    criterion: torch.nn.Module | None = None
    mixup: Any = None  # timm.data.Mixup when --mixup/--cutmix
    batch_augment: Any = None  # recipe.BatchAugment: batch erasing (--resplit) and mixup
    model_ema: Any = None
    state: TrainState = field(default_factory=TrainState)
    saver: CheckpointManager | None = None
    summary: Summary | None = None

    # resume: where the epoch loop starts (a mid-epoch checkpoint restarts inside an epoch)
    start_epoch: int = 0
    skip_batches: int = 0
    resume_partial: dict[str, Any] | None = None

    # diagnose: the treatment losses and the metrics before treatment (also kept across resume)
    doctor: Any = None  # md_plugin.doctor.treatment.ModelDoctor when --md
    before: dict[str, Any] | None = None

    # train: the latest evaluation (top1, top5, loss, per_class, confusion)
    eval_m: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process
