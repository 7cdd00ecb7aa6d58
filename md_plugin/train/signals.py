"""SIGINT/SIGTERM during a run: stop with a resumable state and one line that says how to go on.

Two behaviours, by phase:
- while training (:func:`install_stop_handlers`) the signal is *deferred*: the current step
  finishes, a resumable mid-epoch checkpoint is written, and the run stops (a second signal
  stops at once);
- in a phase with nothing to save midway (:func:`stop_at_once`, the diagnosis) the run stops at
  once; the phase is redone when the run continues.
Either way the error is :class:`RunInterrupted`, whose message names the command that continues
the run in its own folder.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import MDError

__all__ = ["RunInterrupted", "continue_hint", "install_stop_handlers", "stop_at_once"]

_logger = logging.getLogger("train_md")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(MDError):
    """A signal stopped the run; the message says how to continue it."""


def continue_hint(out_dir: Path, nested: bool = False) -> str:
    """How to continue the run in ``out_dir``: the same command plus ``--resume <run folder>``
    (the quickstart's baseline is continued through the run around it)."""
    folder = out_dir.parent if nested else out_dir
    return f"continue with the same command plus --resume {folder}"


def install_stop_handlers(state: Any) -> None:
    """Deferred stop: the step loop sees ``state.stop_requested`` and saves a checkpoint."""

    def handler(signum, _frame):
        if state.stop_requested:  # second signal: stop now
            raise KeyboardInterrupt
        state.stop_requested = True
        _logger.warning("signal %d: saving a resumable checkpoint after this step", signum)

    for sig in _SIGNALS:
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a notebook runner)
            pass


@contextmanager
def stop_at_once(what: str, out_dir: Path, nested: bool = False) -> Iterator[None]:
    """Inside the block a signal raises :class:`RunInterrupted` at once (instead of killing the
    process with no message); the previous handlers are restored after it."""

    def handler(signum, _frame):
        raise RunInterrupted(
            f"interrupted during the {what} (signal {signum}), which is redone when the run "
            f"continues; {continue_hint(out_dir, nested)}"
        )

    previous = {}
    for sig in _SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
