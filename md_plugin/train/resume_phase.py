"""Phase 4 of a run: ``--resume`` restores everything a checkpoint holds.

Weights, optimizer, schedule, AMP scaler, EMA, the checkpoint saver's history, the summary rows
and the counters. A mid-epoch checkpoint (written on SIGINT/SIGTERM) restarts inside its epoch,
at the step it stopped, with the running loss sums and RNG state it saved, so the resumed run
equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any

from ..checkpoint import load_checkpoint_file, load_weights
from ..errors import ConfigError, MDError
from .context import RunContext

__all__ = ["resume"]

_logger = logging.getLogger("train_md")


def resume(ctx: RunContext) -> None:
    """--resume: restore weights, optimizer, schedule, EMA, saver, summary rows and counters."""
    args = ctx.args
    if args.resume:
        ck = load_checkpoint_file(args.resume)
        if "epoch" not in ck or "state_dict" not in ck:
            raise MDError(
                f"{args.resume} is not a train_md.py training checkpoint (no epoch/state)"
            )
        load_weights(ctx.unwrapped, args.resume)
        if not args.no_resume_opt:
            _restore_optimization(ctx, ck)
        if ctx.model_ema is not None and ck.get("state_dict_ema"):
            ctx.model_ema.module.load_state_dict(ck["state_dict_ema"])
        _restore_progress(ctx, ck)
        if ctx.is_main:
            _logger.info(
                "resumed from %s: epoch %d%s",
                args.resume,
                ctx.start_epoch,
                f", step {ctx.skip_batches}" if ctx.skip_batches else "",
            )
    if args.start_epoch is not None:
        ctx.start_epoch = args.start_epoch


def _restore_optimization(ctx: RunContext, ck: dict[str, Any]) -> None:
    """Optimizer, schedule and AMP scaler state (the same ``--sched`` and optimizer only)."""
    args, acc = ctx.args, ctx.acc
    old_sched = (ck.get("args") or {}).get("sched")
    if old_sched is not None and old_sched != args.sched:
        raise ConfigError(
            f"{args.resume} was trained with --sched {old_sched}, not {args.sched}: resuming "
            "would load one schedule's state into another; use the same --sched, or "
            "--no-resume-opt to start a new schedule from its weights"
        )
    if not isinstance(ck.get("optimizer"), dict) or not isinstance(ck.get("scheduler"), dict):
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


def _restore_progress(ctx: RunContext, ck: dict[str, Any]) -> None:
    """Saver history, summary rows, update count, metrics before treatment, where to start."""
    ctx.saver.load_state_dict(ck.get("saver", {}))
    # a mid-epoch checkpoint (SIGINT/SIGTERM) carries "partial": the epoch restarts there
    is_partial = bool(ck.get("partial") or ck.get("partial_step"))
    ctx.summary.rows = [
        r for r in ck.get("summary", []) if int(r["epoch"]) < ck["epoch"] + (0 if is_partial else 1)
    ]
    ctx.state.num_updates = ck.get("num_updates", 0)
    ctx.saver.last_epoch, ctx.saver.last_partial = int(ck["epoch"]), is_partial
    ctx.before = ck.get("before")
    if is_partial:
        ctx.start_epoch, ctx.skip_batches = ck["epoch"], int(ck.get("partial_step") or 0)
        ctx.resume_partial = ck.get("partial") or None
    else:
        ctx.start_epoch = ck["epoch"] + 1
