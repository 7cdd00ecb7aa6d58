"""The phases of one ``train_md.py`` run, in the order :func:`md_plugin.train.main.main` calls them.

1. :func:`build_data`            datasets, class counts, the output folder's path
2. :func:`train_baseline`        quickstart: a nested plain run that makes the checkpoint to treat
3. :func:`build_model_and_task`  model, transforms, run files, loaders, optimizer, accelerate
                                 prepare, schedule, loss, EMA
4. :func:`resume`                weights, optimizer, schedule, summary and counters of --resume
5. :func:`diagnose`              Model Doctor: diagnose (or load a diagnosis), attach the losses
6. :func:`train`                 the epochs: train, evaluate, log, summary, checkpoints
7. :func:`report`                best metric, before/after treatment, the report; ends the run

Each phase takes the :class:`~md_plugin.train.context.RunContext` and fills its part of it.
Only the main process logs and writes files.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import math
import os
import signal
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ConfigError, MDError
from ..rundir import advance_phase, changed_settings, read_phase
from .args import args_to_yaml_dict
from .checkpoint import CheckpointManager, load_checkpoint_file, load_weights
from .context import RunContext, Summary, atomic_text
from .engine import TrainingAborted, TrainState, evaluate, train_one_epoch
from .recipe import set_mixup_epoch

__all__ = [
    "create_accelerator",
    "create_md_model",
    "create_context",
    "build_data",
    "train_baseline",
    "build_model_and_task",
    "resume",
    "diagnose",
    "train",
    "report",
    "save_checkpoint",
]

_logger = logging.getLogger("train_md")


# ----------------------------------------------------------------------------------------------
# factories and small helpers
# ----------------------------------------------------------------------------------------------
def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
        force=True,
    )


def _select_device(args: argparse.Namespace) -> None:
    """``--device cuda:N`` in a single process: make GPU N current before accelerate starts
    (accelerate then uses ``cuda``, the current device). Several processes get one GPU per
    local rank from accelerate, so there the flag is refused."""
    dev = str(args.device or "")
    if dev == "cuda" and not torch.cuda.is_available():
        _logger.warning("--device cuda: no CUDA device here, accelerate trains on the CPU")
    if not dev.startswith("cuda:"):
        return
    index = int(dev.split(":", 1)[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"--device {dev} selects one GPU; with several processes use "
            "`accelerate launch --gpu_ids ...` (or CUDA_VISIBLE_DEVICES) instead"
        )
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(f"--device {dev}: this machine has {have} CUDA device(s)")
    torch.cuda.set_device(index)


def _import_device_modules(args: argparse.Namespace) -> None:
    """timm's ``--device-modules``: import them first (they may register models or backends)."""
    import importlib

    for name in args.device_modules or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"--device-modules: cannot import {name!r}: {e}") from None


def create_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    _select_device(args)
    mixed = None
    if args.amp:
        mixed = "bf16" if args.amp_dtype == "bfloat16" else "fp16"
    acc = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=args.grad_accum_steps,
        cpu=(args.device == "cpu"),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=not args.no_ddp_bb)],
    )
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        warnings.warn(
            "fp16 autocast is not available on CPU: training runs in fp32; use --amp-dtype bfloat16",
            stacklevel=2,
        )
    return acc


def create_md_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    import timm

    from .. import models  # noqa: F401  (register the CIFAR ResNets)

    kwargs: dict[str, Any] = dict(
        pretrained=args.pretrained,
        num_classes=num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        in_chans=args.in_chans,
    )
    if args.pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not timm.is_model(args.model):
        near = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        raise ConfigError(
            f"unknown model {args.model!r}" + (f"; similar: {', '.join(near)}" if near else "")
        )
    try:
        model = timm.create_model(args.model, **kwargs, **args.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"cannot create {args.model}: {e}") from None
    except RuntimeError as e:
        raise ConfigError(f"cannot create {args.model}: {str(e).splitlines()[0]}") from None
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint)
    _init_head(model, args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _init_head(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """timm's ``--head-init-scale`` / ``--head-init-bias`` on the classifier (after loading)."""
    if args.head_init_scale is None and args.head_init_bias is None:
        return
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear | torch.nn.Conv2d):
        raise ConfigError(
            f"--head-init-scale/--head-init-bias: {args.model} has no linear classifier to scale"
        )
    with torch.no_grad():
        if args.head_init_scale is not None:
            head.weight.mul_(args.head_init_scale)
            if head.bias is not None:
                head.bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None and head.bias is not None:
            head.bias.fill_(args.head_init_bias)


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


def _output_dir(args: argparse.Namespace) -> Path:
    if args.resume and not args.output and not args.experiment:
        return _run_dir_of(Path(args.resume))
    root = Path(args.output or "./output/train")
    name = args.experiment or "-".join(
        [datetime.now().strftime("%Y%m%d-%H%M%S"), args.model.replace("/", "_")]
    )
    return root / name


def _run_dir_of(path: Path) -> Path:
    """The run a ``--resume`` path belongs to: a run folder itself, a checkpoint's folder, or
    for the quickstart's ``<run>/baseline/...`` the run around the baseline."""
    path = path.resolve()
    folder = path if path.is_dir() else path.parent
    if folder.name == "baseline" and read_phase(folder.parent) is not None:
        return folder.parent
    return folder


def _lock_run_dir(ctx: RunContext) -> None:
    """Create the run folder and take its lock (main process); every rank stops on failure."""
    from ..rundir import RunDirLock, prepare_run_dir

    err: str | None = None
    if ctx.is_main:
        try:
            prepare_run_dir(ctx.out_dir)
            ctx.lock = RunDirLock(ctx.out_dir).acquire()
            took = ctx.lock.describe_takeover()
            if took:
                _logger.warning("%s: %s", ctx.out_dir, took)
        except MDError as e:
            if ctx.acc.num_processes == 1:
                raise
            err = str(e)
    if ctx.acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [err]
        broadcast_object_list(box)
        err = box[0]
    if err:
        raise MDError(err)


def _plan_run(ctx: RunContext) -> None:
    """Fresh run, continuation of an unfinished one, or refusal; under the run folder's lock.

    The same command again continues an unfinished run (its settings must match args.yaml);
    ``--resume`` continues from ``last.pth.tar`` (or from a run folder, or from the quickstart's
    baseline checkpoint, which means "continue the run around it"). A finished run is refused
    without ``--resume`` and reported as finished with it.
    """
    args, out = ctx.args, ctx.out_dir
    phase = read_phase(out)
    last = out / "last.pth.tar"
    ctx.phase_at_start = phase
    if args.resume:
        given = Path(args.resume).resolve()
        in_baseline = given.parent.name == "baseline" and given.parent.parent == out.resolve()
        if given.is_dir() or in_baseline:  # a run folder, or the quickstart baseline's file
            if not last.is_file() and phase is None:
                raise MDError(f"nothing to resume in {out}: no last.pth.tar and no run state")
            args.resume = str(last) if last.is_file() else ""
        ctx.finished = phase == "done"
        return
    if phase is None:
        if (out / "summary.csv").exists():
            raise ConfigError(
                f"{out} already holds a run (summary.csv); resume it with --resume {last} "
                "or choose another --experiment"
            )
        return
    if phase == "done":
        raise ConfigError(
            f"{out} already holds a run (finished); choose another --experiment "
            f"(--resume {out} only reports it finished)"
        )
    changed = changed_settings(out, args)
    if changed:
        raise ConfigError(
            f"{out} holds an unfinished run with other settings ({', '.join(changed[:6])}); "
            f"continue it with --resume {out} or choose another --experiment"
        )
    args.resume = str(last) if last.is_file() else ""
    if ctx.is_main:
        _logger.info("continuing the unfinished run in %s (it stopped during %s)", out, phase)


def already_finished(ctx: RunContext) -> dict[str, Any]:
    """``--resume`` of a finished run: say so and do nothing."""
    if ctx.is_main:
        _logger.info(
            "%s: this run is already finished (summary.csv, last.pth.tar%s); nothing to do",
            ctx.out_dir,
            ", report/" if (ctx.out_dir / "report").is_dir() else "",
        )
    if not ctx.nested:
        ctx.acc.end_training()
    return {"out_dir": str(ctx.out_dir), "finished": True}


def _install_signal_handlers(state: TrainState) -> None:
    def handler(signum, _frame):
        if state.stop_requested:  # second signal: stop now
            raise KeyboardInterrupt
        state.stop_requested = True
        _logger.warning("signal %d: saving a resumable checkpoint after this step", signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a notebook runner)
            pass


def _image_hw(ds: Any, i: int) -> tuple[int, int]:
    """(height, width) of image ``i``; a file dataset reads only the header."""
    samples = getattr(ds, "samples", None)
    if samples is not None:
        from PIL import Image

        with Image.open(samples[i][0]) as im:
            w, h = im.size
    else:
        w, h = ds[i][0].size
    return h, w


def _append_per_class(path: Path, epoch: int, class_names: list[str], values: list[float]) -> None:
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
    rows = [r for r in rows if int(r[0]) < epoch] + [[str(epoch)] + [f"{v:.2f}" for v in values]]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["epoch"] + class_names)
    w.writerows(rows)
    atomic_text(path, buf.getvalue())


def save_checkpoint(
    ctx: RunContext,
    epoch: int,
    metric: float | None,
    partial_step: int = 0,
    partial: dict[str, Any] | None = None,
) -> None:
    """``last.pth.tar`` (plus best/history through the saver), or a mid-epoch resumable one."""
    acc, args = ctx.acc, ctx.args
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    ck = {
        "epoch": epoch,
        "arch": args.model,
        "state_dict": ctx.unwrapped.state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": ctx.lr_scheduler.state_dict(),
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "state_dict_ema": ctx.model_ema.module.state_dict() if ctx.model_ema is not None else None,
        "args": {k: v for k, v in args_to_yaml_dict(args).items()},
        "summary": ctx.summary.rows,
        "saver": ctx.saver.state_dict(),
        "num_updates": ctx.state.num_updates,
        "before": ctx.before,
        "partial_step": partial_step,
        "partial": partial,  # mid-epoch: running loss sums and RNG state at the interruption
        "version": 2,
    }
    if partial is not None or partial_step:
        ctx.saver.save_partial(ck, epoch)
    else:
        ctx.saver.save(ck, epoch, metric)
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# the phases
# ----------------------------------------------------------------------------------------------
def create_context(args: argparse.Namespace, nested: bool = False) -> RunContext:
    """Accelerator, logging and the seed: what every later phase runs under."""
    from accelerate.utils import set_seed

    _import_device_modules(args)
    acc = create_accelerator(args)
    _setup_logging(acc.is_main_process)
    set_seed(args.seed)
    return RunContext(args=args, acc=acc, nested=nested)


def build_data(ctx: RunContext) -> None:
    """The untransformed datasets, class counts and names; checks that need only the data."""
    from ..data.datasets import create_datasets, get_class_names, get_targets, resolve_num_classes

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
    if ctx.is_main:
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
    # torchvision CIFAR has no validation split: 'validation' is the test set (model_best and the
    # "best metric" are then chosen on test data, as in timm; results should use the final epoch)
    ctx.val_is_test = ctx.test_base is None and args.dataset.lower().split("/")[-1].startswith(
        "cifar"
    )
    if args.batch_size > len(ctx.train_base):
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the training set ({len(ctx.train_base)} images)"
        )
    ctx.out_dir = _output_dir(args)
    _lock_run_dir(ctx)  # a second run on the same folder stops here
    _plan_run(ctx)  # refuses a finished run, continues an unfinished one, before any work


def train_baseline(ctx: RunContext) -> None:
    """Quickstart (``--md --md-baseline-epochs N``): train, then diagnose and treat, in one command.

    The baseline is a nested plain run in ``<output>/baseline``; its last checkpoint becomes
    this run's ``--initial-checkpoint``.
    """
    from accelerate.utils import set_seed

    from .main import main  # the nested run goes through the same entry (signal handlers)

    args = ctx.args
    if not (
        args.md and args.md_baseline_epochs and not args.initial_checkpoint and not args.resume
    ):
        return
    base_dir = ctx.out_dir / "baseline"
    if read_phase(base_dir) == "done":  # finished before an interruption: reuse it
        args.initial_checkpoint = str(base_dir / "last.pth.tar")
        if ctx.is_main:
            _logger.info("baseline: reusing the finished %s", args.initial_checkpoint)
        return
    if ctx.is_main:
        advance_phase(ctx.out_dir, "baseline")
    base_args = copy.deepcopy(args)
    base_args.md = False
    base_args.epochs = args.md_baseline_epochs
    base_args.output = str(ctx.out_dir)
    base_args.experiment = "baseline"
    base_args.md_baseline_epochs = 0
    if ctx.is_main:
        _logger.info("== baseline: %d plain epochs before diagnosis ==", args.md_baseline_epochs)
    ctx.acc.free_memory()
    main(base_args, _nested=True)  # shares this process group: must not end it
    args.initial_checkpoint = str(base_dir / "last.pth.tar")
    set_seed(args.seed)


def build_model_and_task(ctx: RunContext) -> None:
    """Model, transforms, the run's files, loaders, optimizer, accelerate, schedule, loss, EMA."""
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from torch.utils.data import DataLoader, RandomSampler

    from ..data.datasets import TransformedDataset
    from ..data.samplers import check_batch_size, create_sampler
    from ..data.transforms import (
        create_eval_transform,
        create_train_transform,
        train_transform_kwargs,
    )
    from .recipe import (
        create_batch_augment,
        create_mixup,
        create_repeat_sampler,
        create_train_loss,
    )

    args, acc, out_dir = ctx.args, ctx.acc, ctx.out_dir

    # ---- model and transforms -----------------------------------------------------------------
    model = create_md_model(args, ctx.num_classes)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ctx.data_config = data_config = resolve_data_config(vars(args), model=model, verbose=False)
    train_tf = create_train_transform(data_config, **train_transform_kwargs(args))
    ctx.eval_tf = create_eval_transform(data_config)
    masks = None
    if args.md_masks:
        from ..annotate.mask_store import load_masks

        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            masks = load_masks(
                args.md_masks,
                dataset_size=len(ctx.train_base),
                image_size=lambda i: _image_hw(ctx.train_base, i),  # each image's own size
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
            _logger.info(
                "foreground masks: %d of %d training images", len(masks), len(ctx.train_base)
            )
    train_ds = TransformedDataset(ctx.train_base, train_tf, masks if args.md else None)
    val_ds = TransformedDataset(ctx.val_base, ctx.eval_tf)

    # ---- output folder ------------------------------------------------------------------------
    if ctx.is_main:  # the folder was made (and locked) by build_data
        atomic_text(out_dir / "args.yaml", yaml.safe_dump(args_to_yaml_dict(args), sort_keys=False))
        atomic_text(
            out_dir / "train_counts.json",
            json.dumps({"counts": ctx.counts, "classes": ctx.class_names}),
        )
        if ctx.test_base is not None:  # which images were held out, by position in the train split
            atomic_text(out_dir / "held_out.json", json.dumps(ctx.data_info["val_from_train"]))
    acc.wait_for_everyone()

    # ---- loaders, optimizer, scheduler --------------------------------------------------------
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
    else:
        check_batch_size(len(sampler), args.batch_size)
    ctx.sampler = sampler
    pin = args.pin_mem and torch.cuda.is_available()  # pinned memory only helps copies to a GPU
    workers = dict(num_workers=args.workers, persistent_workers=False, pin_memory=pin)
    train_loader = DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True, **workers
    )
    vb = args.validation_batch_size or args.batch_size
    val_loader = DataLoader(val_ds, batch_size=vb, shuffle=False, **workers)

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
    ctx.criterion = create_train_loss(args, ctx.counts).to(acc.device)
    ctx.mixup = create_mixup(args, ctx.num_classes)
    ctx.batch_augment = create_batch_augment(args, ctx.mixup, acc.device)
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ctx.model_ema = ModelEmaV3(
            ctx.unwrapped, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup
        )
    ctx.state = TrainState()
    ctx.saver = CheckpointManager(
        out_dir, args.checkpoint_hist, decreasing=args.eval_metric == "loss"
    )
    ctx.summary = Summary(out_dir / "summary.csv")


def resume(ctx: RunContext) -> None:
    """--resume: restore weights, optimizer, schedule, EMA, saver, summary rows and counters."""
    args, acc = ctx.args, ctx.acc
    if args.resume:
        ck = load_checkpoint_file(args.resume)
        if "epoch" not in ck or "state_dict" not in ck:
            raise MDError(
                f"{args.resume} is not a train_md.py training checkpoint (no epoch/state)"
            )
        load_weights(ctx.unwrapped, args.resume)
        old_sched = (ck.get("args") or {}).get("sched")
        if not args.no_resume_opt and old_sched is not None and old_sched != args.sched:
            raise ConfigError(
                f"{args.resume} was trained with --sched {old_sched}, not {args.sched}: resuming "
                "would load one schedule's state into another; use the same --sched, or "
                "--no-resume-opt to start a new schedule from its weights"
            )
        if not args.no_resume_opt:
            if not isinstance(ck.get("optimizer"), dict) or not isinstance(
                ck.get("scheduler"), dict
            ):
                raise MDError(
                    f"{args.resume} has no optimizer/scheduler state (not a train_md.py "
                    "checkpoint?); start from its weights with --initial-checkpoint instead"
                )
            try:
                ctx.optimizer.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise MDError(
                    f"cannot restore the optimizer state from {args.resume} (another --opt or "
                    f"model?): {' '.join(str(e).split())[:200]}"
                ) from None
            ctx.lr_scheduler.load_state_dict(ck["scheduler"])
            if acc.scaler is not None and ck.get("scaler"):
                acc.scaler.load_state_dict(ck["scaler"])
        if ctx.model_ema is not None and ck.get("state_dict_ema"):
            ctx.model_ema.module.load_state_dict(ck["state_dict_ema"])
        ctx.saver.load_state_dict(ck.get("saver", {}))
        # a mid-epoch checkpoint (SIGINT/SIGTERM) carries "partial": the epoch restarts there
        is_partial = bool(ck.get("partial") or ck.get("partial_step"))
        ctx.summary.rows = [
            r
            for r in ck.get("summary", [])
            if int(r["epoch"]) < ck["epoch"] + (0 if is_partial else 1)
        ]
        ctx.state.num_updates = ck.get("num_updates", 0)
        ctx.saver.last_epoch, ctx.saver.last_partial = int(ck["epoch"]), is_partial
        ctx.before = ck.get("before")
        if is_partial:
            ctx.start_epoch, ctx.skip_batches = ck["epoch"], int(ck.get("partial_step") or 0)
            ctx.resume_partial = ck.get("partial") or None
        else:
            ctx.start_epoch = ck["epoch"] + 1
        if ctx.is_main:
            _logger.info(
                "resumed from %s: epoch %d%s",
                args.resume,
                ctx.start_epoch,
                f", step {ctx.skip_batches}" if ctx.skip_batches else "",
            )
    if args.start_epoch is not None:
        ctx.start_epoch = args.start_epoch


def diagnose(ctx: RunContext) -> None:
    """Model Doctor (``--md``): diagnose (or load a diagnosis), then attach the treatment losses.

    Sets ``ctx.doctor`` and, unless a resumed checkpoint carried them, ``ctx.before`` (the
    metrics before treatment).
    """
    if not ctx.args.md:
        return
    from torch.utils.data import DataLoader

    from ..data.datasets import TransformedDataset, create_dataset
    from ..doctor import Diagnosis
    from ..doctor import diagnose as run_diagnosis
    from ..doctor.diagnosis import shard_dataset
    from ..doctor.treatment import ModelDoctor, check_wrapped_model
    from .tables import format_diagnosis_table

    args, acc, data_config = ctx.args, ctx.acc, ctx.data_config
    # a saved diagnosis does not make a random model trained: the check holds with it too
    if not (args.initial_checkpoint or args.pretrained or args.resume):
        raise ConfigError(
            "Model Doctor treats a trained model: pass --initial-checkpoint (or --md-baseline-epochs N "
            "to train one first)"
        )
    if ctx.is_main:
        advance_phase(ctx.out_dir, "diagnosis")
    saved = ctx.out_dir / "diagnosis.safetensors"
    continuing = ctx.phase_at_start in ("training", "report")
    if args.md_diagnosis:
        diag = _fit_diagnosis(ctx, Diagnosis.load(args.md_diagnosis), args.md_diagnosis)
    elif (args.resume or continuing) and saved.exists():
        diag = Diagnosis.load(saved)
    else:
        split = args.md_diagnosis_split or args.train_split
        if split == args.val_split or split.lower() in ("validation", "val", "test", "eval"):
            if not args.md_allow_val_diagnosis:
                raise ConfigError(
                    f"refusing to diagnose on the validation split {split!r} (it leaks the evaluation "
                    "set into training); pass --md-allow-val-diagnosis to force it"
                )
            warnings.warn(
                f"diagnosing on {split!r}: the evaluation set leaks into training", stacklevel=2
            )
        if args.val_from_train and split != args.train_split:
            raise ConfigError(
                f"--md-diagnosis-split {split!r} with --val-from-train: another split can hold the "
                "held-out images (e.g. 'training' is the whole CIFAR training set); the diagnosis "
                f"uses the training images left after the hold-out (--train-split {args.train_split!r})"
            )
        base = (
            ctx.train_base  # without the --val-from-train hold-out
            if split == args.train_split
            else create_dataset(
                args.dataset,
                args.data_dir,
                split,
                imb_ratio=args.imb_ratio,
                imb_type=args.imb_type,
                imb_seed=args.imb_seed,
            )
        )
        if split != args.train_split and args.class_map:
            from ..data.class_map import apply_class_map

            base = apply_class_map(base, args.class_map, args.data_dir)
        # each image on exactly one rank (a prepared loader would pad with repeated images,
        # which could then enter a class's top-N twice)
        diag_loader = DataLoader(
            shard_dataset(
                TransformedDataset(base, ctx.eval_tf), acc.num_processes, acc.process_index
            ),
            batch_size=args.validation_batch_size or args.batch_size,
            shuffle=False,
            num_workers=args.workers,
        )
        diag = run_diagnosis(
            ctx.unwrapped, diag_loader, args.md_layers, ctx.num_classes, per_class=args.md_per_class,
            min_confidence=args.md_min_confidence, grad_mode=args.md_grad_mode,
            gate_activation=args.md_gate_activation, mask_rule=args.md_mask_rule, theta=args.md_theta,
            topk=args.md_topk, accelerator=acc, progress=acc.is_main_process and not args.no_progress and sys.stderr.isatty(),
            input_size=data_config["input_size"],
        )  # fmt: skip
        if acc.is_main_process:
            diag.save(saved)
    if acc.is_main_process:
        _logger.info(
            "diagnosis (%s):\n%s",
            args.md_diagnosis or saved,
            format_diagnosis_table(diag, ctx.class_names),
        )
    check_wrapped_model(ctx.model)
    doctor = ModelDoctor(
        ctx.unwrapped, diag, alpha=args.md_alpha, beta=args.md_beta, grad_mode=args.md_grad_mode,
        true_term=not args.md_no_true_term, confusing_term=not args.md_no_confusing_term,
        loss_kind=args.md_loss, monitor=args.md_monitor, num_classes=ctx.num_classes,
        input_size=data_config["input_size"], every=args.md_every,
    )  # fmt: skip
    if ctx.before is None and args.md_eval_before:
        doctor.capture.enabled = False
        ev = evaluate(ctx.model, ctx.val_loader, acc, ctx.num_classes)
        doctor.capture.enabled = True
        ctx.before = {
            "top1": ev["top1"],
            "top5": ev["top5"],
            "per_class": ev["per_class"],
            "confusion": ev["confusion"].tolist(),
        }
        if acc.is_main_process:
            _logger.info("before treatment: top1 %.2f top5 %.2f", ev["top1"], ev["top5"])
    ctx.doctor = doctor


def _fit_diagnosis(ctx: RunContext, diag: Any, path: str) -> Any:
    """A ``--md-diagnosis`` file made to match this run's model, layers and mask options.

    Another architecture is named as such; ``--md-layers`` must be among the diagnosis' layers
    (only those are used); the run's mask rule/theta/topk are applied to the saved scores. A
    mismatch is either applied (and logged) or an error, never silently dropped.
    """
    from ..doctor.diagnosis import Diagnosis, model_fingerprint
    from ..layers import resolve_layers

    args, model = ctx.args, ctx.unwrapped
    mine = model_fingerprint(model, [])
    if diag.fingerprint.get("params") != mine["params"]:
        raise MDError(
            "diagnosis was made for a model with different parameter shapes "
            f"({diag.fingerprint.get('arch')!r}, this model is {mine['arch']!r}): {path}"
        )
    names = [r.name for r in resolve_layers(model, args.md_layers, ctx.data_config["input_size"])]
    missing = [n for n in names if n not in diag.layers]
    if missing:
        raise ConfigError(
            f"--md-layers {args.md_layers!r} is {', '.join(names)}, but the diagnosis {path} "
            f"covers {', '.join(diag.layer_names)}: pass --md-layers {','.join(diag.layer_names)} "
            "or diagnose again"
        )
    if names != diag.layer_names:
        fp = dict(
            diag.fingerprint, layers={n: diag.fingerprint.get("layers", {}).get(n) for n in names}
        )
        diag = Diagnosis({n: diag.layers[n] for n in names}, diag.counts, fp, diag.options)
    opts = diag.options
    want = (args.md_mask_rule, args.md_theta, args.md_topk)
    if (opts.get("mask_rule"), opts.get("theta"), opts.get("topk")) != want:
        diag = diag.remask(*want)
        if ctx.is_main:
            _logger.info(
                "diagnosis %s: masks recomputed from its scores with --md-mask-rule %s "
                "(theta %s, topk %s; the file used %s/%s/%s)",
                path, *want, opts.get("mask_rule"), opts.get("theta"), opts.get("topk"),
            )  # fmt: skip
    return diag


def train(ctx: RunContext) -> None:
    """The epochs: train, evaluate, log, summary.csv, per-class files and checkpoints."""
    _install_signal_handlers(ctx.state)
    args = ctx.args
    if ctx.is_main:
        advance_phase(ctx.out_dir, "training")
        if ctx.start_epoch >= ctx.num_epochs:
            _logger.info(
                "nothing left to train: the checkpoint is at epoch %d of %d",
                ctx.start_epoch,
                ctx.num_epochs,
            )
    show_eval = ctx.is_main and not args.no_progress and sys.stderr.isatty()
    if ctx.is_main:
        _logger.info(
            "training %s for %d epochs (lr %.4g, batch %d x %d processes), output: %s",
            args.model,
            ctx.num_epochs,
            args.lr,
            args.batch_size,
            ctx.acc.num_processes,
            ctx.out_dir,
        )
    for epoch in range(ctx.start_epoch, ctx.num_epochs):
        try:
            train_m = _train_epoch(ctx, epoch)
        except TrainingAborted as e:  # name the checkpoint that is actually good (or none)
            raise TrainingAborted(f"{e} {ctx.saver.last_good()}") from None
        ep_eval = _evaluate_epoch(ctx, epoch, show_eval)
        metric = ep_eval[args.eval_metric] if ep_eval else None
        _log_epoch(ctx, epoch, train_m, ep_eval)
        # step the schedule before saving: the checkpoint then holds the next epoch's lr (and a
        # plateau schedule has seen this epoch's metric), so a resumed run continues exactly
        ctx.lr_scheduler.step(epoch + 1, metric)
        prev_best = ctx.saver.best
        save_checkpoint(ctx, epoch, metric)
        best = ctx.saver.best
        if ctx.is_main and best is not None and best != prev_best and best[1] == epoch:
            atomic_text(ctx.out_dir / "best_per_class.json", json.dumps(
                {"epoch": epoch, "classes": ctx.class_names, "accuracy": ctx.eval_m["per_class"]}, indent=1))  # fmt: skip


def _train_epoch(ctx: RunContext, epoch: int) -> dict[str, float]:
    """One epoch of training; an interruption saves a resumable checkpoint and stops the run."""
    from accelerate.utils import set_seed

    args, state = ctx.args, ctx.state
    set_seed(args.seed + epoch)  # same augmentation/dropout randomness whether resumed or not
    ctx.generator.manual_seed(args.seed + epoch)
    if hasattr(ctx.sampler, "set_epoch"):
        ctx.sampler.set_epoch(epoch)
    if hasattr(ctx.criterion, "set_epoch"):
        ctx.criterion.set_epoch(epoch)
    set_mixup_epoch(ctx.mixup, args, epoch)
    train_m = train_one_epoch(
        epoch, ctx.model, ctx.train_loader, ctx.optimizer, ctx.criterion, ctx.acc, args, state,
        lr_scheduler=ctx.lr_scheduler, doctor=ctx.doctor, model_ema=ctx.model_ema,
        skip_batches=ctx.skip_batches, partial=ctx.resume_partial, mixup_fn=ctx.batch_augment,
    )  # fmt: skip
    ctx.skip_batches, ctx.resume_partial = 0, None
    # "interrupted" is agreed by all ranks in the step loop; a signal that lands after the
    # epoch's last step is honoured after the first step of the next epoch
    if state.extra.pop("interrupted", False):
        save_checkpoint(
            ctx,
            epoch,
            None,
            partial_step=state.extra.get("interrupted_step", 0),
            partial=state.extra.get("partial"),
        )
        # the quickstart's baseline is continued through the run around it
        where = ctx.out_dir.parent if ctx.nested else ctx.out_dir / "last.pth.tar"
        raise MDError(f"interrupted: resumable checkpoint saved, continue with --resume {where}")
    if ctx.acc.num_processes > 1 and args.dist_bn:
        from timm.utils import distribute_bn

        distribute_bn(ctx.model, ctx.acc.num_processes, args.dist_bn == "reduce")
    return train_m


def _evaluate_epoch(ctx: RunContext, epoch: int, show_eval: bool) -> dict[str, Any]:
    """Evaluate on ``--val-interval`` epochs and the last one (EMA weights when --model-ema).

    Returns ``{}`` on epochs without evaluation; otherwise also stores it in ``ctx.eval_m``.
    """
    if not ((epoch + 1) % ctx.args.val_interval == 0 or epoch == ctx.num_epochs - 1):
        return {}
    doctor, acc = ctx.doctor, ctx.acc
    if doctor is not None:
        doctor.capture.enabled = False
    ep_eval = evaluate(ctx.model, ctx.val_loader, acc, ctx.num_classes, progress=show_eval)
    if ctx.model_ema is not None:
        ema_m = evaluate(ctx.model_ema.module, ctx.val_loader, acc, ctx.num_classes)
        ep_eval = {**ema_m, "raw_top1": ep_eval["top1"]}
    if doctor is not None:
        doctor.capture.enabled = True
    ctx.eval_m = ep_eval
    return ep_eval


def _log_epoch(
    ctx: RunContext, epoch: int, train_m: dict[str, float], ep_eval: dict[str, Any]
) -> None:
    """The epoch's summary.csv row, per_class_acc.csv row and log line (main process)."""
    from ..metrics import shot_accuracy

    lr = ctx.optimizer.param_groups[0]["lr"]
    row = {
        "epoch": epoch,
        **{f"train_{k}": round(v, 6) for k, v in train_m.items() if k != "img_per_s"},
    }
    if ep_eval:
        row.update({f"eval_{k}": round(ep_eval[k], 4) for k in ("loss", "top1", "top5")})
        if min(ctx.counts) <= 100:  # long-tailed: many/medium/few-shot accuracy
            shots = shot_accuracy(torch.tensor(ep_eval["per_class"]), ctx.counts)
            row.update({f"eval_{k}": round(float(v), 4) for k, v in shots.items()})
    row["lr"] = lr
    if not ctx.is_main:
        return
    ctx.summary.add(row)
    md_txt = (
        f" (ce {train_m['ce']:.4f} md_ch {train_m['md_channel']:.4f} md_sp {train_m['md_spatial']:.4f})"
        if ctx.doctor
        else ""
    )
    ev_txt = ""
    if ep_eval:
        _append_per_class(
            ctx.out_dir / "per_class_acc.csv", epoch, ctx.class_names, ep_eval["per_class"]
        )
        ev_txt = f" | eval loss {ep_eval['loss']:.4f} top1 {ep_eval['top1']:.2f} top5 {ep_eval['top5']:.2f}"
    _logger.info(
        "Epoch %d/%d | train loss %.4f%s%s | lr %.4g | %.0f img/s%s",
        epoch + 1, ctx.num_epochs, train_m["loss"], md_txt, ev_txt, lr, train_m["img_per_s"],
        f" | skipped {train_m['skipped_steps']}" if train_m["skipped_steps"] else "",
    )  # fmt: skip


def report(ctx: RunContext) -> dict[str, Any]:
    """Best metric, before/after treatment and the treatment report; ends the run.

    The best epoch is logged 1-based, as the "Epoch N/M" lines count (summary.csv and
    ``best_per_class.json`` keep timm's 0-based ``epoch``).
    """
    args, saver = ctx.args, ctx.saver
    if ctx.is_main:
        advance_phase(ctx.out_dir, "report")
    if ctx.doctor is not None and ctx.before is not None and not ctx.eval_m:
        # resumed after the last epoch (e.g. the report was interrupted): evaluate the final
        # model again so the report can be rebuilt
        ctx.doctor.capture.enabled = False
        ctx.eval_m = evaluate(ctx.model, ctx.val_loader, ctx.acc, ctx.num_classes)
        ctx.doctor.capture.enabled = True
    eval_m = ctx.eval_m
    result = {
        "out_dir": str(ctx.out_dir),
        "top1": eval_m.get("top1"),
        "top5": eval_m.get("top5"),
        "per_class": eval_m.get("per_class"),
        "best": saver.best,
    }
    if ctx.is_main:
        if saver.best:
            _logger.info(
                "*** Best metric: %.4f (epoch %d); final-epoch top1 %.2f%s",
                saver.best[0],
                saver.best[1] + 1,
                eval_m.get("top1", float("nan")),
                ""
                if not ctx.val_is_test
                else " (the validation split is the test set: report the final epoch)",
            )
        if ctx.doctor is not None and ctx.before is not None and eval_m:
            _logger.info(
                "Model Doctor: top1 before treatment %.2f -> after %.2f",
                ctx.before["top1"],
                eval_m["top1"],
            )
            if args.md_report:
                _write_report(ctx)
    if ctx.doctor is not None:
        ctx.doctor.remove()
    if ctx.test_base is not None:
        result["test"] = _final_test(ctx)
    if ctx.is_main:
        advance_phase(ctx.out_dir, "done")
    ctx.acc.wait_for_everyone()
    if not ctx.nested:
        ctx.acc.end_training()
    return result


def _final_test(ctx: RunContext) -> dict[str, Any]:
    """With --val-from-train: evaluate the held-out-selected best checkpoint on the test set once.

    Writes ``test_results.json`` (which checkpoint, which epoch, top-1/top-5, per class); the
    summary's ``eval_*`` columns are the held-out validation set, not the test set.
    """
    from torch.utils.data import DataLoader

    from ..data.datasets import TransformedDataset

    args, acc, saver = ctx.args, ctx.acc, ctx.saver
    best_path = ctx.out_dir / "model_best.pth.tar"
    which, epoch = "last", None
    if saver.best is not None and best_path.is_file():
        load_weights(ctx.unwrapped, best_path, prefer_ema=bool(args.model_ema))
        which, epoch = "model_best", int(saver.best[1])
    loader = DataLoader(
        TransformedDataset(ctx.test_base, ctx.eval_tf),
        batch_size=args.validation_batch_size or args.batch_size,
        shuffle=False,
        num_workers=args.workers,
    )
    m = evaluate(ctx.model, acc.prepare(loader), acc, ctx.num_classes)  # model wraps unwrapped
    out = {
        "checkpoint": which,
        "epoch": epoch,
        "selected_on": f"{args.val_from_train} images held out from {args.train_split!r}",
        "test_split": args.val_split,
        "images": m["count"],
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
        "classes": ctx.class_names,
        "per_class": m["per_class"],
    }
    if acc.is_main_process:
        atomic_text(ctx.out_dir / "test_results.json", json.dumps(out, indent=1))
        _logger.info(
            "*** TEST (split %r, %d images, read once): top1 %.2f top5 %.2f with %s%s "
            "(selected on the held-out validation images) -> test_results.json",
            args.val_split, m["count"], m["top1"], m["top5"], which,
            f" (epoch {epoch + 1})" if epoch is not None else "",
        )  # fmt: skip
    return out


def _write_report(ctx: RunContext) -> None:
    from .report_hook import write_treatment_report

    try:
        path = write_treatment_report(
            ctx.out_dir / "report",
            ctx.doctor,
            ctx.unwrapped,
            ctx.before,
            ctx.eval_m,
            ctx.class_names,
            ctx.train_base,
            ctx.eval_tf,
            ctx.args,
        )
        _logger.info("report: %s", path)
    except Exception as e:  # a figure must never cost the user a finished training run
        _logger.warning("could not write the report: %s", e)
