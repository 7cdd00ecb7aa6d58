"""Phase 3 of a run: the model and everything that trains it.

Model and transforms, the ``--md-masks`` foreground masks, the run files (``args.yaml``,
``train_counts.json``, ``held_out.json``), the loaders and sampler, the optimizer and
``accelerate.prepare``, the schedule, the loss, batch augmentation and EMA.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from typing import Any

import torch
import yaml
from PIL import Image
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, RandomSampler

from ..annotate.mask_store import load_masks
from ..config import args_to_yaml_dict
from ..data.datasets import TransformedDataset
from ..data.samplers import check_batch_size, create_sampler
from ..data.transforms import create_eval_transform, create_train_transform, train_transform_kwargs
from ..errors import ConfigError
from .checkpoint import CheckpointManager
from .context import RunContext, Summary, atomic_text
from .engine import TrainState
from .model import create_md_model
from .recipe import create_batch_augment, create_mixup, create_repeat_sampler, create_train_loss

__all__ = ["build_model_and_task"]

_logger = logging.getLogger("train_md")


def build_model_and_task(ctx: RunContext) -> None:
    """Model, transforms, the run's files, loaders, optimizer, accelerate, schedule, loss, EMA."""
    args = ctx.args
    model = create_md_model(args, ctx.num_classes)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ctx.data_config = data_config = resolve_data_config(vars(args), model=model, verbose=False)
    train_tf = create_train_transform(data_config, **train_transform_kwargs(args))
    ctx.eval_tf = create_eval_transform(data_config)
    masks = _load_masks(ctx) if args.md_masks else None
    train_ds = TransformedDataset(ctx.train_base, train_tf, masks if args.md else None)
    val_ds = TransformedDataset(ctx.val_base, ctx.eval_tf)
    if ctx.is_main:  # the folder was made (and locked) by build_data
        _write_run_files(ctx)
    ctx.acc.wait_for_everyone()
    train_loader, val_loader = _create_loaders(ctx, train_ds, val_ds)
    _create_optimization(ctx, model, train_loader, val_loader)
    ctx.criterion = create_train_loss(args, ctx.counts).to(ctx.acc.device)
    ctx.mixup = create_mixup(args, ctx.num_classes)
    ctx.batch_augment = create_batch_augment(args, ctx.mixup, ctx.acc.device)
    if args.model_ema:
        ctx.model_ema = ModelEmaV3(
            ctx.unwrapped, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup
        )
    ctx.state = TrainState()
    ctx.saver = CheckpointManager(
        ctx.out_dir, args.checkpoint_hist, decreasing=args.eval_metric == "loss"
    )
    ctx.summary = Summary(ctx.out_dir / "summary.csv")


def image_hw(ds: Any, i: int) -> tuple[int, int]:
    """(height, width) of image ``i``; a file dataset reads only the header."""
    samples = getattr(ds, "samples", None)
    if samples is not None:
        with Image.open(samples[i][0]) as im:
            w, h = im.size
    else:
        w, h = ds[i][0].size
    return h, w


def _load_masks(ctx: RunContext) -> dict[int, Any]:
    """``--md-masks``: the foreground masks that fit the training images (by index)."""
    args = ctx.args
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        masks = load_masks(
            args.md_masks,
            dataset_size=len(ctx.train_base),
            image_size=lambda i: image_hw(ctx.train_base, i),  # each image's own size
        )
    if args.md and args.md_beta > 0 and not masks:
        why = f" ({len(skipped)} skipped, e.g. {skipped[0].message})" if skipped else ""
        raise ConfigError(
            f"--md-beta {args.md_beta} needs foreground masks, but no mask in {args.md_masks} "
            f"fits the training images{why}: the spatial term would be off"
        )
    for w in skipped:  # not an error: pass the per-file reasons on
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if ctx.is_main:
        _logger.info("foreground masks: %d of %d training images", len(masks), len(ctx.train_base))
    return masks


def _write_run_files(ctx: RunContext) -> None:
    """``args.yaml``, ``train_counts.json`` and, with ``--val-from-train``, ``held_out.json``."""
    out_dir = ctx.out_dir
    atomic_text(out_dir / "args.yaml", yaml.safe_dump(args_to_yaml_dict(ctx.args), sort_keys=False))
    atomic_text(
        out_dir / "train_counts.json",
        json.dumps({"counts": ctx.counts, "classes": ctx.class_names}),
    )
    if ctx.test_base is not None:  # which images were held out, by position in the train split
        atomic_text(out_dir / "held_out.json", json.dumps(ctx.data_info["val_from_train"]))


def _create_loaders(
    ctx: RunContext, train_ds: TransformedDataset, val_ds: TransformedDataset
) -> tuple[DataLoader, DataLoader]:
    """The sampler (``--sampler``, ``--aug-repeats`` or plain shuffling) and both loaders."""
    args = ctx.args
    sampler = create_sampler(
        args.sampler, ctx.targets, num_samples_cls=args.sampler_k, epoch_length=args.sampler_epoch_length,
        total_epochs=args.epochs, seed=args.seed,
    )  # fmt: skip
    ctx.generator = torch.Generator()
    if sampler is None:
        sampler = create_repeat_sampler(args, train_ds)  # --aug-repeats (timm's sampler)
    if sampler is None:  # plain shuffling; --sampler-epoch-length draws that many per epoch
        sampler = RandomSampler(
            train_ds, num_samples=args.sampler_epoch_length, generator=ctx.generator
        )
    check_batch_size(len(sampler), args.batch_size)
    ctx.sampler = sampler
    pin = args.pin_mem and torch.cuda.is_available()  # pinned memory only helps copies to a GPU
    workers = dict(num_workers=args.workers, persistent_workers=False, pin_memory=pin)
    train_loader = DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True, **workers
    )
    vb = args.validation_batch_size or args.batch_size
    val_loader = DataLoader(val_ds, batch_size=vb, shuffle=False, **workers)
    return train_loader, val_loader


def _lr(args: argparse.Namespace, world: int) -> float:
    """timm's rule: lr = lr_base * global_batch / lr_base_size (sqrt for adaptive optimizers)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or (
        "sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear"
    )
    return args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


def _create_optimization(
    ctx: RunContext, model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader
) -> None:
    """The optimizer, ``accelerate.prepare`` of model/optimizer/loaders, and the schedule."""
    args, acc = ctx.args, ctx.acc
    if args.lr is None:
        args.lr = _lr(args, acc.num_processes)
    opt_kw = optimizer_kwargs(cfg=args)
    opt_kw.update(args.opt_kwargs)
    optimizer = create_optimizer_v2(model, **opt_kw)
    ctx.model, ctx.optimizer, ctx.train_loader, ctx.val_loader = acc.prepare(
        model, optimizer, train_loader, val_loader
    )
    ctx.unwrapped = acc.unwrap_model(ctx.model)
    updates_per_epoch = max(1, len(ctx.train_loader) // args.grad_accum_steps)
    ctx.lr_scheduler, ctx.num_epochs = create_scheduler_v2(
        ctx.optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
