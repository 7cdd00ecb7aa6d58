"""Phase 6 of a run: the epochs. Train, evaluate, log, ``summary.csv``, checkpoints.

Each epoch reseeds every RNG from ``--seed`` and the epoch number, so a resumed run draws the same
batches and augmentations as an uninterrupted one. SIGINT/SIGTERM finish the current step, save
a resumable mid-epoch checkpoint and stop the run with the line that continues it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from timm.utils import distribute_bn

from ..config import args_to_yaml_dict
from ..metrics import shot_accuracy
from ..rundir import advance_phase
from .context import RunContext, atomic_text
from .engine import TrainingAborted, evaluate, train_one_epoch
from .recipe import set_mixup_epoch
from .signals import RunInterrupted, continue_hint, install_stop_handlers

__all__ = ["train", "save_checkpoint"]

_logger = logging.getLogger("train_md")


def train(ctx: RunContext) -> None:
    """The epochs: train, evaluate, log, summary.csv, per-class files and checkpoints."""
    install_stop_handlers(ctx.state)
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


def _train_epoch(ctx: RunContext, epoch: int) -> dict[str, float]:
    """One epoch of training; an interruption saves a resumable checkpoint and stops the run."""
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
        raise RunInterrupted(
            f"interrupted: resumable checkpoint saved, {continue_hint(ctx.out_dir, ctx.nested)}"
        )
    if ctx.acc.num_processes > 1 and args.dist_bn:
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


def _log_epoch(
    ctx: RunContext, epoch: int, train_m: dict[str, float], ep_eval: dict[str, Any]
) -> None:
    """The epoch's summary.csv row, per_class_acc.csv row and log line (main process)."""
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
