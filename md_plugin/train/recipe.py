"""timm's training recipe from train.py's flags, built from timm's own pieces.

* mixup / cutmix: ``timm.data.Mixup`` (all of timm's flags; ``--smoothing`` smooths the mixed
  targets, ``--mixup-off-epoch`` turns it off), applied to each batch on the device;
* the loss: timm's choice (``SoftTargetCrossEntropy`` under mixup, ``BinaryCrossEntropy`` with
  ``--bce-loss``), else train_md.py's ``--loss`` factory (label smoothing, long-tail losses);
* ``--aug-repeats``: ``timm.data.RepeatAugSampler``;
* ``--resplit``: random erasing on the batch with timm's clean first half (as timm's prefetcher).

Model Doctor under soft targets: its channel terms need one class per sample, the *dominant*
label (:func:`md_plugin.doctor.dominant_label`, the class with the largest target weight: a mixed
image's own label when its share is >= 0.5, else its partner's).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from ..data.transforms import create_random_erasing
from ..errors import ConfigError
from ..losses.classification import create_loss
from .args import mixup_active

__all__ = [
    "create_mixup",
    "create_train_loss",
    "create_repeat_sampler",
    "BatchAugment",
    "create_batch_augment",
    "set_mixup_epoch",
]

_logger = logging.getLogger("train_md")


def create_mixup(args: argparse.Namespace, num_classes: int):
    """``timm.data.Mixup`` from timm's flags, or None when mixup/cutmix is off."""
    if not mixup_active(args):
        return None
    if args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair images within a batch: --batch-size must be even, got {args.batch_size}")  # fmt: skip
    return Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing, num_classes=num_classes,
    )  # fmt: skip


def set_mixup_epoch(mixup, args: argparse.Namespace, epoch: int) -> None:
    """timm's ``--mixup-off-epoch``: no mixing from that epoch on (smoothed targets remain)."""
    if mixup is not None:
        mixup.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)


def create_train_loss(args: argparse.Namespace, counts: Sequence[int]) -> nn.Module:
    """The training loss by timm's rule, falling back to ``--loss`` for integer targets.

    mixup/cutmix: SoftTargetCrossEntropy (or BinaryCrossEntropy with ``--bce-loss``; the mixed
    targets already carry the smoothing). Otherwise ``--bce-loss`` is BinaryCrossEntropy with
    ``--smoothing``, and anything else is ``create_loss(--loss ...)``. One deliberate difference:
    timm's train.py silently trains plain CE for ``--bce-loss --smoothing 0`` without mixup;
    here that is BCE without smoothing, as asked.
    """
    bce = dict(
        target_threshold=args.bce_target_thresh,
        sum_classes=args.bce_sum,
        pos_weight=args.bce_pos_weight,
    )
    if mixup_active(args):
        return (
            BinaryCrossEntropy(smoothing=0.0, **bce) if args.bce_loss else SoftTargetCrossEntropy()
        )
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing, **bce)
    return create_loss(
        args.loss, cls_num_list=counts, smoothing=args.smoothing, focal_gamma=args.focal_gamma,
        rfl_threshold=args.rfl_threshold, cb_beta=args.cb_beta, ldam_max_m=args.ldam_max_m,
        ldam_s=args.ldam_s, la_tau=args.la_tau, drw_epoch=args.drw_epoch,
    )  # fmt: skip


def create_repeat_sampler(args: argparse.Namespace, dataset) -> Any:
    """``timm.data.RepeatAugSampler`` for ``--aug-repeats`` (None when off).

    One global order (accelerate shards its batches over the processes): each image appears
    ``aug_repeats`` times in a row with different augmentations, and an epoch keeps the length
    of the dataset (rounded down to a multiple of 256 when it has at least 256 images), as in
    timm. Like timm's, the order depends on the epoch only.
    """
    if not args.aug_repeats:
        return None
    repeats = args.aug_repeats
    repeats = int(repeats) if float(repeats).is_integer() else float(repeats)
    return RepeatAugSampler(dataset, num_replicas=1, rank=0, shuffle=True, num_repeats=repeats)


class BatchAugment:
    """What timm's prefetcher and ``mixup_fn`` do to a batch on the device: random erasing
    (``--resplit``: the first half of the batch stays clean), then mixup/cutmix."""

    def __init__(self, erase=None, mixup=None):
        self.erase = erase
        self.mixup = mixup

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return x, y


def create_batch_augment(args: argparse.Namespace, mixup, device) -> BatchAugment | None:
    """The per-batch augmentation for these flags, or None when there is none."""
    erase = None
    if args.resplit and args.reprob > 0:
        erase = create_random_erasing(args.reprob, args.remode, args.recount, device=device)
        erase.num_splits = 2  # timm: re_num_splits = num_aug_splits or 2
    if erase is None and mixup is None:
        return None
    return BatchAugment(erase, mixup)
