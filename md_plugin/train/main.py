"""``train_md.py``: timm-style training on accelerate, with Model Doctor diagnosis and treatment.

A run is a sequence of phases (:mod:`md_plugin.train.phases`) that hand each other one
:class:`~md_plugin.train.context.RunContext`:

    build data -> (baseline run) -> build model and task -> resume -> diagnose -> train -> report

Only the main process logs and writes files.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from ..errors import MDError
from . import phases
from .args import parse_args

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
    ctx = phases.create_context(args, nested)  # accelerator, logging, seed
    try:
        phases.build_data(ctx)  # datasets, labels, output folder: locked, fresh or continued
        if ctx.finished:  # --resume of a finished run
            return phases.already_finished(ctx)
        phases.train_baseline(ctx)  # --md --md-baseline-epochs: nested plain run first
        phases.build_model_and_task(ctx)  # model, run files, loaders, optimizer, schedule, ...
        phases.resume(ctx)  # --resume
        phases.diagnose(ctx)  # --md: diagnosis and treatment losses
        phases.train(ctx)  # epochs: train, evaluate, summary, checkpoints
        return phases.report(ctx)  # best metric, before/after, report; ends the run
    finally:
        if ctx.lock is not None:
            ctx.lock.release()


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
