"""Phase 1 of a run: the untransformed datasets, the labels, and the locked run folder.

Everything that needs only the data is checked here, before the model is built: labels against
the class count, the batch size against the training set. The run folder is then chosen,
created and locked (:func:`md_plugin.rundir.lock_run_dir`), and :func:`md_plugin.rundir.plan_run`
decides whether this command starts, continues or refuses the run in it.
"""

from __future__ import annotations

import logging

import torch

from ..data.datasets import create_datasets, get_class_names, get_targets, resolve_num_classes
from ..errors import ConfigError, MDError
from ..rundir import lock_run_dir, plan_run
from .context import RunContext

__all__ = ["build_data"]

_logger = logging.getLogger("train_md")


def build_data(ctx: RunContext) -> None:
    """The untransformed datasets, class counts and names; then the run folder (locked)."""
    _load_datasets(ctx)
    if ctx.is_main:
        _log_datasets(ctx)
    args = ctx.args
    if args.batch_size > len(ctx.train_base):
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the training set ({len(ctx.train_base)} images)"
        )
    ctx.out_dir, ctx.lock = lock_run_dir(args, ctx.acc)  # a second run on the folder stops here
    if ctx.lock is not None and ctx.lock.describe_takeover():
        _logger.warning("%s: %s", ctx.out_dir, ctx.lock.describe_takeover())
    plan = plan_run(args, ctx.out_dir)  # refuses a finished run, continues an unfinished one
    ctx.phase_at_start, ctx.finished = plan.phase, plan.finished
    if plan.continuing and ctx.is_main:
        _logger.info(
            "continuing the unfinished run in %s (it stopped during %s)", ctx.out_dir, plan.phase
        )


def _load_datasets(ctx: RunContext) -> None:
    """Datasets, targets, class count (every label of every split checked), counts, names."""
    args = ctx.args
    ds_kw = dict(
        download=args.dataset_download, imb_ratio=args.imb_ratio, imb_type=args.imb_type,
        imb_seed=args.imb_seed, input_size=(args.input_size[-1] if args.input_size else (args.img_size or 32)),
    )  # fmt: skip
    splits = create_datasets(
        args.dataset, args.data_dir, args.train_split, args.val_split,
        class_map=args.class_map, class_cap=args.class_cap, val_from_train=args.val_from_train,
        data_seed=args.data_seed, **ds_kw,
    )  # fmt: skip
    ctx.train_base, ctx.val_base, ctx.test_base = splits.train, splits.val, splits.test
    ctx.data_info = splits.info
    ctx.targets = targets = get_targets(ctx.train_base)
    if len(ctx.train_base) == 0:
        raise MDError("the training set is empty")
    # every label of both splits against the class count, before any training
    evalsets = [("validation", ctx.val_base)]
    if ctx.test_base is not None:
        evalsets.append(("test", ctx.test_base))
    ctx.num_classes = resolve_num_classes(
        ctx.train_base, evalsets, args.num_classes, train_targets=targets
    )
    ctx.counts = torch.bincount(torch.tensor(targets), minlength=ctx.num_classes).tolist()
    ctx.class_names = get_class_names(ctx.train_base, ctx.num_classes)
    # torchvision CIFAR has no validation split: 'validation' is the test set (model_best and the
    # "best metric" are then chosen on test data, as in timm; results should use the final epoch)
    ctx.val_is_test = ctx.test_base is None and args.dataset.lower().split("/")[-1].startswith(
        "cifar"
    )


def _log_datasets(ctx: RunContext) -> None:
    args = ctx.args
    _logger.info(
        "training set: %d images, %d classes; per-class counts: %s",
        len(ctx.train_base),
        ctx.num_classes,
        ctx.counts,
    )
    if ctx.test_base is None:
        _logger.info("validation set: %d images (split %r)", len(ctx.val_base), args.val_split)
    else:
        _logger.info(
            "validation set: %d images held out from the training split (stratified, "
            "--data-seed %d; per class %s): they select the best epoch; test set: %d images "
            "(split %r), evaluated once at the end",
            len(ctx.val_base), args.data_seed, ctx.data_info["val_from_train"]["per_class"],
            len(ctx.test_base), args.val_split,
        )  # fmt: skip
    if args.class_map:
        _logger.info("class map %s: classes %s", args.class_map, ctx.class_names)
