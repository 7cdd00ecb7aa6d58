"""The trainer's checkpoint files: ``last.pth.tar``, ``model_best.pth.tar`` and the history.

The checkpoint I/O itself (atomic save, weights_only load, hashes) lives in the neutral
:mod:`md_plugin.checkpoint`, shared with the splitter and ``md-doctor``; its names are
re-exported here for code that imported them from this module. A checkpoint whose weights or
buffers are not finite is never written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..checkpoint import (
    NonFiniteCheckpoint,
    atomic_save,
    file_hash,
    load_checkpoint_file,
    load_weights,
    non_finite_tensors,
    state_dict_of,
    weights_hash,
)
from ..errors import MDError

__all__ = [
    "CheckpointManager",
    "NonFiniteCheckpoint",
    "atomic_save",
    "file_hash",
    "load_checkpoint_file",
    "load_weights",
    "non_finite_tensors",
    "state_dict_of",
    "weights_hash",
]

_state_dict = state_dict_of  # the old private name, still imported by older code


class CheckpointManager:
    """``last.pth.tar`` every epoch, ``model_best.pth.tar`` and the best ``--checkpoint-hist``.

    Nothing is written when the model or EMA state holds NaN/inf (``NonFiniteCheckpoint``), so
    every checkpoint in the folder is a good one and :meth:`last_good` can name it.

    Args:
        out_dir: The run folder.
        max_history: How many ``checkpoint-<epoch>`` files to keep (0: no best/history files).
        decreasing: A lower metric is better (a loss).
    """

    def __init__(self, out_dir: Path, max_history: int = 10, decreasing: bool = False):
        self.out_dir = Path(out_dir)
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: list[tuple[float, int]] = []  # (metric, epoch)
        self.best: tuple[float, int] | None = None
        self.last_epoch: int | None = None  # epoch of the last checkpoint written or resumed
        self.last_partial = False

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def state_dict(self) -> dict[str, Any]:
        """The best/history bookkeeping, saved in every checkpoint as ``saver``.

        Returns:
            ``{"history": [[metric, epoch], ...], "best": [metric, epoch] or None}``.
        """
        return {
            "history": [list(h) for h in self.history],
            "best": list(self.best) if self.best else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the bookkeeping from a checkpoint's ``saver`` entry (resume).

        Args:
            sd: What :meth:`state_dict` returned.
        """
        self.history = [(float(m), int(e)) for m, e in sd.get("history", [])]
        self.best = tuple(sd["best"]) if sd.get("best") else None  # type: ignore[assignment]

    def last_good(self) -> str:
        """One sentence naming the checkpoint to go back to (or saying there is none).

        Returns:
            The sentence, for the end of an error message.
        """
        path = self.out_dir / "last.pth.tar"
        if self.last_epoch is None or not path.is_file():
            return "No checkpoint was written yet (nothing to resume)."
        what = f"epoch {self.last_epoch}" + (", mid-epoch" if self.last_partial else "")
        return f"The last good checkpoint is {path} ({what})."

    def _check_finite(self, state: dict[str, Any], epoch: int) -> None:
        bad = non_finite_tensors(state.get("state_dict"))
        bad += [f"ema:{k}" for k in non_finite_tensors(state.get("state_dict_ema"))]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise NonFiniteCheckpoint(
                f"the model holds NaN/inf after epoch {epoch} in {len(bad)} tensors "
                f"({', '.join(bad[:3])}{more}); not saved. {self.last_good()}"
            )

    def save_partial(self, state: dict[str, Any], epoch: int) -> Path:
        """Mid-epoch ``last.pth.tar`` (a signal); the best/history files are left alone.

        Args:
            state: The checkpoint dict (its ``saver`` entry is set to this manager's state).
            epoch: The epoch under way.

        Returns:
            The path of ``last.pth.tar``.
        """
        self._check_finite(state, epoch)
        last = self._write({**state, "saver": self.state_dict()}, "last.pth.tar")
        self.last_epoch, self.last_partial = epoch, True
        return last

    def save(self, state: dict[str, Any], epoch: int, metric: float | None) -> Path:
        """End of an epoch: ``model_best`` and ``checkpoint-<epoch>`` first, ``last`` last.

        ``last.pth.tar`` is the commit point. It is written after the best/history files and
        holds the saver state that includes this epoch, and this manager's own state changes
        only once it is written. So if a write fails (a full disk), the previous
        ``last.pth.tar`` and its saver state stay: the run resumed from it trains this epoch
        again and weighs it for best-model selection again, instead of leaving it out.

        Args:
            state: The checkpoint dict (its ``saver`` entry is set to the updated state).
            epoch: The epoch just finished.
            metric: Its evaluation metric (None or non-finite: not a best/history candidate).

        Returns:
            The path of ``last.pth.tar``.

        Raises:
            NonFiniteCheckpoint: The weights hold NaN/inf (nothing is written).
            MDError: A write failed (one line, naming the last good checkpoint).
        """
        self._check_finite(state, epoch)
        keep, drop, best = list(self.history), [], self.best
        candidate = metric is not None and self.max_history > 0 and math.isfinite(metric)
        if candidate:
            if best is None or self._better(metric, best[0]):
                best = (metric, epoch)
            history = [h for h in keep if h[1] != epoch] + [(metric, epoch)]
            history.sort(key=lambda h: h[0], reverse=not self.decreasing)
            keep, drop = history[: self.max_history], history[self.max_history :]
        saver = {"history": [list(h) for h in keep], "best": list(best) if best else None}
        state = {**state, "saver": saver}
        if candidate and best == (metric, epoch):
            self._write(state, "model_best.pth.tar")
        if candidate:
            self._write(state, f"checkpoint-{epoch}.pth.tar")
        last = self._write(state, "last.pth.tar")
        self.history, self.best = keep, best
        self.last_epoch, self.last_partial = epoch, False
        for _m, ep in drop:
            (self.out_dir / f"checkpoint-{ep}.pth.tar").unlink(missing_ok=True)
        return last

    def _write(self, state: dict[str, Any], name: str) -> Path:
        try:
            return atomic_save(state, self.out_dir / name)
        except NonFiniteCheckpoint:
            raise
        except MDError as e:  # a failed write: say what is still good
            raise MDError(f"{e}. {self.last_good()}") from None
