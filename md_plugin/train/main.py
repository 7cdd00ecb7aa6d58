"""``train_md.py``: timm-style training on accelerate, with Model Doctor diagnosis and treatment.

A run is a sequence of phases that hand each other one
:class:`~md_plugin.train.context.RunContext`, each in its own module:

    device.create_context         accelerator, logging, seed
    data_phase.build_data         datasets, labels, the run folder (locked, fresh or continued)
    train_baseline (here)         quickstart: a nested plain run makes the checkpoint to treat
    task_phase.build_model_and_task  model, run files, loaders, optimizer, schedule, loss, EMA
    resume_phase.resume           --resume: weights, optimizer, schedule, summary, counters
    diagnose_phase.diagnose       --md: diagnosis and treatment losses
    epochs.train                  epochs: train, evaluate, summary, checkpoints
    report_phase.report           best metric, before/after, report; ends the run

The baseline run is orchestrated here because it is a whole run itself (it calls :func:`main`).
Only the main process logs and writes files.
"""

from __future__ import annotations

import argparse
import copy
import logging
import signal
import sys
import warnings
from typing import Any

from accelerate.utils import set_seed

from ..errors import MDError, format_warning
from ..rundir import advance_phase, finished_message, read_phase
from .args import parse_args
from .context import RunContext
from .data_phase import build_data
from .device import create_context
from .diagnose_phase import diagnose
from .epochs import train
from .model import check_initial_checkpoint
from .report_phase import report
from .resume_phase import resume
from .task_phase import build_model_and_task

__all__ = ["main", "cli"]

_logger = logging.getLogger("train_md")


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
    """The phases, top to bottom; each reads and fills the same context."""
    ctx = create_context(args, nested)  # accelerator, logging, seed
    check_initial_checkpoint(args)  # a NaN/inf checkpoint is refused before any work
    try:
        build_data(ctx)  # datasets, labels, output folder: locked, fresh or continued
        if ctx.finished:  # --resume of a finished run
            return already_finished(ctx)
        train_baseline(ctx)  # --md --md-baseline-epochs: nested plain run first
        build_model_and_task(ctx)  # model, run files, loaders, optimizer, schedule, ...
        resume(ctx)  # --resume
        diagnose(ctx)  # --md: diagnosis and treatment losses
        train(ctx)  # epochs: train, evaluate, summary, checkpoints
        return report(ctx)  # best metric, before/after, report; ends the run
    finally:
        if ctx.lock is not None:
            ctx.lock.release()


def already_finished(ctx: RunContext) -> dict[str, Any]:
    """``--resume`` of a finished run: say so and do nothing."""
    if ctx.is_main:
        _logger.info("%s", finished_message(ctx.out_dir))
    if not ctx.nested:
        ctx.acc.end_training()
    return {"out_dir": str(ctx.out_dir), "finished": True}


def train_baseline(ctx: RunContext) -> None:
    """Quickstart (``--md --md-baseline-epochs N``): train, then diagnose and treat, in one command.

    The baseline is a nested plain run (through :func:`main`, so it has the same signal
    handling) in ``<output>/baseline``; its last checkpoint becomes this run's
    ``--initial-checkpoint``.
    """
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
    warnings.formatwarning = format_warning  # our warnings: one line each
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
