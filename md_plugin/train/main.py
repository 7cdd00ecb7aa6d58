"""``train_md.py``: timm-style training on accelerate, with Model Doctor diagnosis and treatment.

Order of work: parse -> accelerator -> data -> model -> (baseline phase) -> diagnosis -> loaders,
optimizer, scheduler -> resume -> epochs (train, eval, summary, checkpoint) -> report.
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
from .args import args_to_yaml_dict, parse_args
from .checkpoint import CheckpointManager, atomic_save, load_checkpoint_file, load_weights
from .engine import TrainState, evaluate, train_one_epoch

__all__ = ["main", "cli"]

_logger = logging.getLogger("train_md")


# ----------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------
def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
        force=True,
    )


def create_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

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
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


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
        return Path(args.resume).resolve().parent
    root = Path(args.output or "./output/train")
    name = args.experiment or "-".join(
        [datetime.now().strftime("%Y%m%d-%H%M%S"), args.model.replace("/", "_")]
    )
    out = root / name
    if not args.resume and (out / "summary.csv").exists():
        raise ConfigError(
            f"{out} already holds a run (summary.csv); resume it with --resume {out / 'last.pth.tar'} "
            "or choose another --experiment"
        )
    return out


class _Summary:
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
        _atomic_text(self.path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, *, _nested: bool = False) -> dict[str, Any]:
    """Run one training (plus diagnosis when ``--md``); returns final metrics.

    The SIGINT/SIGTERM handlers installed for the run are restored on return, so an in-process
    caller (a notebook, a test) gets its own handlers back.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args, _nested)
    finally:
        for sig, handler in previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):  # not the main thread, or a handler set from C
                pass


def _run(args: argparse.Namespace, nested: bool) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from torch.utils.data import DataLoader, RandomSampler

    from ..data.datasets import TransformedDataset, create_dataset, get_class_names, get_targets
    from ..data.samplers import check_batch_size, create_sampler
    from ..data.transforms import create_eval_transform, create_train_transform
    from ..losses.classification import create_loss
    from ..metrics import shot_accuracy

    acc = create_accelerator(args)
    is_main = acc.is_main_process
    _setup_logging(is_main)
    set_seed(args.seed)

    # ---- data (untransformed) -----------------------------------------------------------
    ds_kw = dict(
        download=args.dataset_download, imb_ratio=args.imb_ratio, imb_type=args.imb_type,
        imb_seed=args.imb_seed, input_size=(args.input_size[-1] if args.input_size else (args.img_size or 32)),
    )  # fmt: skip
    train_base = create_dataset(args.dataset, args.data_dir, args.train_split, **ds_kw)
    val_base = create_dataset(args.dataset, args.data_dir, args.val_split, **ds_kw)
    targets = get_targets(train_base)
    num_classes = args.num_classes or (max(targets) + 1 if targets else 0)
    if len(train_base) == 0:
        raise MDError("the training set is empty")
    counts = torch.bincount(torch.tensor(targets), minlength=num_classes).tolist()
    class_names = get_class_names(train_base, num_classes)
    if is_main:
        _logger.info(
            "training set: %d images, %d classes; per-class counts: %s",
            len(train_base),
            num_classes,
            counts,
        )
        _logger.info("validation set: %d images (split %r)", len(val_base), args.val_split)
    # torchvision CIFAR has no validation split: 'validation' is the test set (model_best and the
    # "best metric" are then chosen on test data, as in timm; results should use the final epoch)
    val_is_test = args.dataset.lower().split("/")[-1].startswith("cifar")
    if args.batch_size > len(train_base):
        raise ConfigError(
            f"--batch-size {args.batch_size} is larger than the training set ({len(train_base)} images)"
        )

    # ---- baseline phase (quickstart: train, then diagnose and treat, in one command) ---------
    out_dir = _output_dir(args)
    if args.md and args.md_baseline_epochs and not args.initial_checkpoint and not args.resume:
        base_args = copy.deepcopy(args)
        base_args.md = False
        base_args.epochs = args.md_baseline_epochs
        base_args.output = str(out_dir)
        base_args.experiment = "baseline"
        base_args.md_baseline_epochs = 0
        if is_main:
            _logger.info(
                "== baseline: %d plain epochs before diagnosis ==", args.md_baseline_epochs
            )
        acc.free_memory()
        main(base_args, _nested=True)  # shares this process group: must not end it
        args.initial_checkpoint = str(out_dir / "baseline" / "last.pth.tar")
        set_seed(args.seed)

    # ---- model ------------------------------------------------------------------------------
    model = create_md_model(args, num_classes)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    train_tf = create_train_transform(
        data_config, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, reprob=args.reprob,
        crop_padding=args.crop_padding,
        interpolation=None if args.train_interpolation == "random" else args.train_interpolation,
    )  # fmt: skip
    eval_tf = create_eval_transform(data_config)
    masks = None
    if args.md_masks:
        from ..annotate.mask_store import load_masks

        w, h = train_base[0][0].size
        masks = load_masks(args.md_masks, dataset_size=len(train_base), image_size=(h, w))
        if is_main:
            _logger.info("foreground masks: %d of %d training images", len(masks), len(train_base))
    train_ds = TransformedDataset(train_base, train_tf, masks if args.md else None)
    val_ds = TransformedDataset(val_base, eval_tf)

    # ---- output folder ------------------------------------------------------------------------
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_text(
            out_dir / "args.yaml", yaml.safe_dump(args_to_yaml_dict(args), sort_keys=False)
        )
        _atomic_text(
            out_dir / "train_counts.json", json.dumps({"counts": counts, "classes": class_names})
        )
    acc.wait_for_everyone()

    # ---- loaders, optimizer, scheduler ----------------------------------------------------------
    sampler = create_sampler(
        args.sampler, targets, num_samples_cls=args.sampler_k, epoch_length=args.sampler_epoch_length,
        total_epochs=args.epochs, seed=args.seed,
    )  # fmt: skip
    generator = torch.Generator()
    if sampler is None:  # plain shuffling; --sampler-epoch-length draws that many per epoch
        sampler = RandomSampler(
            train_ds, num_samples=args.sampler_epoch_length, generator=generator
        )
        check_batch_size(len(sampler), args.batch_size)
    else:
        check_batch_size(len(sampler), args.batch_size)
    workers = dict(num_workers=args.workers, persistent_workers=False, pin_memory=False)
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
    model, optimizer, train_loader, val_loader = acc.prepare(
        model, optimizer, train_loader, val_loader
    )
    unwrapped = acc.unwrap_model(model)
    updates_per_epoch = max(1, len(train_loader) // args.grad_accum_steps)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
    criterion = create_loss(
        args.loss, cls_num_list=counts, smoothing=args.smoothing, focal_gamma=args.focal_gamma,
        rfl_threshold=args.rfl_threshold, cb_beta=args.cb_beta, ldam_max_m=args.ldam_max_m,
        ldam_s=args.ldam_s, la_tau=args.la_tau, drw_epoch=args.drw_epoch,
    ).to(acc.device)  # fmt: skip
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        model_ema = ModelEmaV3(
            unwrapped, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup
        )

    # ---- resume -----------------------------------------------------------------------------------
    state = TrainState()
    saver = CheckpointManager(out_dir, args.checkpoint_hist, decreasing=args.eval_metric == "loss")
    summary = _Summary(out_dir / "summary.csv")
    start_epoch, skip_batches = 0, 0
    resume_partial: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    if args.resume:
        ck = load_checkpoint_file(args.resume)
        if "epoch" not in ck or "state_dict" not in ck:
            raise MDError(
                f"{args.resume} is not a train_md.py training checkpoint (no epoch/state)"
            )
        load_weights(unwrapped, args.resume)
        if not args.no_resume_opt:
            if not isinstance(ck.get("optimizer"), dict) or not isinstance(
                ck.get("scheduler"), dict
            ):
                raise MDError(
                    f"{args.resume} has no optimizer/scheduler state (not a train_md.py "
                    "checkpoint?); start from its weights with --initial-checkpoint instead"
                )
            try:
                optimizer.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise MDError(
                    f"cannot restore the optimizer state from {args.resume} (another --opt or "
                    f"model?): {' '.join(str(e).split())[:200]}"
                ) from None
            lr_scheduler.load_state_dict(ck["scheduler"])
            if acc.scaler is not None and ck.get("scaler"):
                acc.scaler.load_state_dict(ck["scaler"])
        if model_ema is not None and ck.get("state_dict_ema"):
            model_ema.module.load_state_dict(ck["state_dict_ema"])
        saver.load_state_dict(ck.get("saver", {}))
        # a mid-epoch checkpoint (SIGINT/SIGTERM) carries "partial": the epoch restarts there
        is_partial = bool(ck.get("partial") or ck.get("partial_step"))
        summary.rows = [
            r
            for r in ck.get("summary", [])
            if int(r["epoch"]) < ck["epoch"] + (0 if is_partial else 1)
        ]
        state.num_updates = ck.get("num_updates", 0)
        before = ck.get("before")
        if is_partial:
            start_epoch, skip_batches = ck["epoch"], int(ck.get("partial_step") or 0)
            resume_partial = ck.get("partial") or None
        else:
            start_epoch = ck["epoch"] + 1
        if is_main:
            _logger.info(
                "resumed from %s: epoch %d%s",
                args.resume,
                start_epoch,
                f", step {skip_batches}" if skip_batches else "",
            )
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    # ---- Model Doctor -----------------------------------------------------------------------------
    doctor = None
    if args.md:
        doctor, before = _setup_doctor(
            args,
            acc,
            model,
            unwrapped,
            train_base,
            eval_tf,
            val_loader,
            num_classes,
            class_names,
            out_dir,
            before,
            data_config,
        )

    # ---- epochs -------------------------------------------------------------------------------------
    _install_signal_handlers(state)
    show_eval = is_main and not args.no_progress and sys.stderr.isatty()
    eval_m: dict[str, Any] = {}
    if is_main:
        _logger.info(
            "training %s for %d epochs (lr %.4g, batch %d x %d processes), output: %s",
            args.model,
            num_epochs,
            args.lr,
            args.batch_size,
            acc.num_processes,
            out_dir,
        )
    for epoch in range(start_epoch, num_epochs):
        set_seed(args.seed + epoch)  # same augmentation/dropout randomness whether resumed or not
        generator.manual_seed(args.seed + epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(criterion, "set_epoch"):
            criterion.set_epoch(epoch)
        train_m = train_one_epoch(
            epoch, model, train_loader, optimizer, criterion, acc, args, state,
            lr_scheduler=lr_scheduler, doctor=doctor, model_ema=model_ema, skip_batches=skip_batches,
            partial=resume_partial,
        )  # fmt: skip
        skip_batches, resume_partial = 0, None
        # "interrupted" is agreed by all ranks in the step loop; a signal that lands after the
        # epoch's last step is honoured after the first step of the next epoch
        if state.extra.pop("interrupted", False):
            _save(
                acc,
                saver,
                unwrapped,
                optimizer,
                lr_scheduler,
                model_ema,
                args,
                epoch,
                summary,
                state,
                before,
                None,
                partial_step=state.extra.get("interrupted_step", 0),
                partial=state.extra.get("partial"),
            )
            raise MDError(
                f"interrupted: resumable checkpoint saved, continue with --resume {out_dir / 'last.pth.tar'}"
            )
        if acc.num_processes > 1 and args.dist_bn:
            from timm.utils import distribute_bn

            distribute_bn(model, acc.num_processes, args.dist_bn == "reduce")
        lr = optimizer.param_groups[0]["lr"]
        row = {
            "epoch": epoch,
            **{f"train_{k}": round(v, 6) for k, v in train_m.items() if k != "img_per_s"},
        }
        metric = None
        ep_eval: dict[str, Any] = {}
        if (epoch + 1) % args.val_interval == 0 or epoch == num_epochs - 1:
            if doctor is not None:
                doctor.capture.enabled = False
            ep_eval = evaluate(model, val_loader, acc, num_classes, progress=show_eval)
            if model_ema is not None:
                ema_m = evaluate(model_ema.module, val_loader, acc, num_classes)
                ep_eval = {**ema_m, "raw_top1": ep_eval["top1"]}
            if doctor is not None:
                doctor.capture.enabled = True
            eval_m = ep_eval
            row.update({f"eval_{k}": round(eval_m[k], 4) for k in ("loss", "top1", "top5")})
            if min(counts) <= 100:  # long-tailed: many/medium/few-shot accuracy
                shots = shot_accuracy(torch.tensor(eval_m["per_class"]), counts)
                row.update({f"eval_{k}": round(float(v), 4) for k, v in shots.items()})
            metric = eval_m[args.eval_metric]
        row["lr"] = lr
        if is_main:
            summary.add(row)
            md_txt = (
                f" (ce {train_m['ce']:.4f} md_ch {train_m['md_channel']:.4f} md_sp {train_m['md_spatial']:.4f})"
                if doctor
                else ""
            )
            ev_txt = ""
            if ep_eval:
                _append_per_class(
                    out_dir / "per_class_acc.csv", epoch, class_names, ep_eval["per_class"]
                )
                ev_txt = f" | eval loss {ep_eval['loss']:.4f} top1 {ep_eval['top1']:.2f} top5 {ep_eval['top5']:.2f}"
            _logger.info(
                "Epoch %d/%d | train loss %.4f%s%s | lr %.4g | %.0f img/s%s",
                epoch + 1, num_epochs, train_m["loss"], md_txt, ev_txt, lr, train_m["img_per_s"],
                f" | skipped {train_m['skipped_steps']}" if train_m["skipped_steps"] else "",
            )  # fmt: skip
        # step the schedule before saving: the checkpoint then holds the next epoch's lr (and a
        # plateau schedule has seen this epoch's metric), so a resumed run continues exactly
        lr_scheduler.step(epoch + 1, metric)
        prev_best = saver.best
        _save(
            acc,
            saver,
            unwrapped,
            optimizer,
            lr_scheduler,
            model_ema,
            args,
            epoch,
            summary,
            state,
            before,
            metric,
        )
        if (
            is_main
            and saver.best is not None
            and saver.best != prev_best
            and saver.best[1] == epoch
        ):
            _atomic_text(out_dir / "best_per_class.json", json.dumps(
                {"epoch": epoch, "classes": class_names, "accuracy": eval_m["per_class"]}, indent=1))  # fmt: skip
    result = {
        "out_dir": str(out_dir),
        "top1": eval_m.get("top1"),
        "top5": eval_m.get("top5"),
        "per_class": eval_m.get("per_class"),
        "best": saver.best,
    }
    if is_main:
        if saver.best:
            _logger.info(
                "*** Best metric: %.4f (epoch %d); final-epoch top1 %.2f%s",
                saver.best[0],
                saver.best[1],
                eval_m.get("top1", float("nan")),
                ""
                if not val_is_test
                else " (the validation split is the test set: report the final epoch)",
            )
        if doctor is not None and before is not None and eval_m:
            _logger.info(
                "Model Doctor: top1 before treatment %.2f -> after %.2f",
                before["top1"],
                eval_m["top1"],
            )
            if args.md_report:
                _write_report(
                    out_dir,
                    args,
                    doctor,
                    unwrapped,
                    before,
                    eval_m,
                    class_names,
                    train_base,
                    eval_tf,
                )
    if doctor is not None:
        doctor.remove()
    acc.wait_for_everyone()
    if not nested:
        acc.end_training()
    return result


def _save(
    acc,
    saver,
    unwrapped,
    optimizer,
    sched,
    ema,
    args,
    epoch,
    summary,
    state,
    before,
    metric,
    partial_step: int = 0,
    partial: dict[str, Any] | None = None,
) -> None:
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return
    ck = {
        "epoch": epoch,
        "arch": args.model,
        "state_dict": unwrapped.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "state_dict_ema": ema.module.state_dict() if ema is not None else None,
        "args": {k: v for k, v in args_to_yaml_dict(args).items()},
        "summary": summary.rows,
        "saver": saver.state_dict(),
        "num_updates": state.num_updates,
        "before": before,
        "partial_step": partial_step,
        "partial": partial,  # mid-epoch: running loss sums and RNG state at the interruption
        "version": 2,
    }
    if partial is not None or partial_step:
        atomic_save(ck, saver.out_dir / "last.pth.tar")
    else:
        saver.save(ck, epoch, metric)
    acc.wait_for_everyone()


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
    _atomic_text(path, buf.getvalue())


def _setup_doctor(
    args,
    acc,
    model,
    unwrapped,
    train_base,
    eval_tf,
    val_loader,
    num_classes,
    class_names,
    out_dir,
    before,
    data_config,
):
    """Diagnose (or load a diagnosis), then attach the treatment losses to the model."""
    from torch.utils.data import DataLoader

    from ..data.datasets import TransformedDataset, create_dataset
    from ..doctor import Diagnosis, diagnose
    from ..doctor.diagnosis import shard_dataset
    from ..losses.treatment import ModelDoctor, check_wrapped_model
    from .tables import format_diagnosis_table

    if not (args.initial_checkpoint or args.pretrained or args.resume or args.md_diagnosis):
        raise ConfigError(
            "Model Doctor treats a trained model: pass --initial-checkpoint (or --md-baseline-epochs N "
            "to train one first)"
        )
    saved = out_dir / "diagnosis.safetensors"
    if args.md_diagnosis:
        diag = Diagnosis.load(args.md_diagnosis)
    elif args.resume and saved.exists():
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
        base = (
            train_base
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
        # each image on exactly one rank (a prepared loader would pad with repeated images,
        # which could then enter a class's top-N twice)
        diag_loader = DataLoader(
            shard_dataset(TransformedDataset(base, eval_tf), acc.num_processes, acc.process_index),
            batch_size=args.validation_batch_size or args.batch_size,
            shuffle=False,
            num_workers=args.workers,
        )
        diag = diagnose(
            unwrapped, diag_loader, args.md_layers, num_classes, per_class=args.md_per_class,
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
            format_diagnosis_table(diag, class_names),
        )
    check_wrapped_model(model)
    doctor = ModelDoctor(
        unwrapped, diag, alpha=args.md_alpha, beta=args.md_beta, grad_mode=args.md_grad_mode,
        true_term=not args.md_no_true_term, confusing_term=not args.md_no_confusing_term,
        loss_kind=args.md_loss, monitor=args.md_monitor, num_classes=num_classes, input_size=data_config["input_size"],
    )  # fmt: skip
    if before is None:
        doctor.capture.enabled = False
        ev = evaluate(model, val_loader, acc, num_classes)
        doctor.capture.enabled = True
        before = {
            "top1": ev["top1"],
            "top5": ev["top5"],
            "per_class": ev["per_class"],
            "confusion": ev["confusion"].tolist(),
        }
        if acc.is_main_process:
            _logger.info("before treatment: top1 %.2f top5 %.2f", ev["top1"], ev["top5"])
    return doctor, before


def _write_report(
    out_dir, args, doctor, unwrapped, before, after, class_names, train_base, eval_tf
) -> None:
    from .report_hook import write_treatment_report

    try:
        path = write_treatment_report(
            out_dir / "report",
            doctor,
            unwrapped,
            before,
            after,
            class_names,
            train_base,
            eval_tf,
            args,
        )
        _logger.info("report: %s", path)
    except Exception as e:  # a figure must never cost the user a finished training run
        _logger.warning("could not write the report: %s", e)


def _one_line(e: BaseException) -> str:
    """The message of a user error on one line.

    A DataLoader worker re-raises an error as the same type with the worker's traceback text
    as its message: keep only the original message, its last line.
    """
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def cli(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2; bugs keep their traceback."""
    try:
        args = parse_args(argv)
        main(args)
    except MDError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
