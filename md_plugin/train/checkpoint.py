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
        return {
            "history": [list(h) for h in self.history],
            "best": list(self.best) if self.best else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.history = [(float(m), int(e)) for m, e in sd.get("history", [])]
        self.best = tuple(sd["best"]) if sd.get("best") else None  # type: ignore[assignment]

    def last_good(self) -> str:
        """One sentence naming the checkpoint to go back to (or saying there is none)."""
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
        """Mid-epoch ``last.pth.tar`` (a signal); the best/history files are left alone."""
        self._check_finite(state, epoch)
        last = atomic_save(state, self.out_dir / "last.pth.tar")
        self.last_epoch, self.last_partial = epoch, True
        return last

    def save(self, state: dict[str, Any], epoch: int, metric: float | None) -> Path:
        self._check_finite(state, epoch)
        last = atomic_save(state, self.out_dir / "last.pth.tar")
        self.last_epoch, self.last_partial = epoch, False
        if metric is None or self.max_history <= 0 or not math.isfinite(metric):
            return last
        if self.best is None or self._better(metric, self.best[0]):
            self.best = (metric, epoch)
            atomic_save(state, self.out_dir / "model_best.pth.tar")
        self.history.append((metric, epoch))
        self.history.sort(key=lambda h: h[0], reverse=not self.decreasing)
        atomic_save(state, self.out_dir / f"checkpoint-{epoch}.pth.tar")
        for _m, ep in self.history[self.max_history :]:
            (self.out_dir / f"checkpoint-{ep}.pth.tar").unlink(missing_ok=True)
        self.history = self.history[: self.max_history]
        return last
