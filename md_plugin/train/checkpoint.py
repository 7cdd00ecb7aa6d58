"""Atomic checkpoints and weight loading with readable errors.

Every file is written to a unique temporary name in the same folder, fsynced and renamed into
place (:mod:`md_plugin.files`), so a kill during a save leaves the previous ``last.pth.tar``
intact; files get mode 0666 minus the umask like every other output. Checkpoints hold
only tensors and plain Python values (args as a dict), so they load with
``torch.load(weights_only=True)``; a checkpoint whose weights or buffers are not finite is never
written.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MDError
from ..files import atomic_write

__all__ = [
    "atomic_save",
    "load_checkpoint_file",
    "load_weights",
    "non_finite_tensors",
    "CheckpointManager",
    "NonFiniteCheckpoint",
]


class NonFiniteCheckpoint(MDError):
    """The state to save holds NaN/inf: writing it would replace a good checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`md_plugin.files.atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def non_finite_tensors(state_dict: dict[str, Any] | None) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` that hold NaN or inf."""
    bad = []
    for k, v in (state_dict or {}).items():
        if (
            isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and not bool(torch.isfinite(v).all())
        ):
            bad.append(k)
    return bad


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only; timm checkpoints (argparse args inside) are accepted too."""
    path = Path(path)
    if not path.is_file():
        raise MDError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path))}
        except Exception as e:  # safetensors raises several types for damaged files
            raise MDError(f"cannot read checkpoint {path}: corrupt or truncated ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged pickle makes the unpickler raise almost any type
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MDError(f"cannot read checkpoint {path}: corrupt or truncated ({msg})") from None
    if not isinstance(obj, dict):
        raise MDError(f"checkpoint {path} does not hold a state dict")
    return obj


def _state_dict(obj: dict[str, Any], prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    keys = ("state_dict_ema", "state_dict", "model") if prefer_ema else ("state_dict", "model")
    for k in keys:
        if k in obj and isinstance(obj[k], dict):
            sd = obj[k]
            break
    else:
        sd = obj
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | Path, prefer_ema: bool = False) -> None:
    """Load model weights from a timm/md_plugin checkpoint, a bare state dict or safetensors."""
    sd = _state_dict(load_checkpoint_file(path), prefer_ema)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:3]
        raise MDError(
            f"checkpoint {path} does not fit this model: {' '.join(first) or str(e)[:200]}"
        ) from None


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
