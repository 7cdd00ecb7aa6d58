"""Atomic checkpoints and weight loading with readable errors.

Every file is written to a temporary name in the same folder and renamed into place, so a kill
during a save leaves the previous ``last.pth.tar`` intact. Checkpoints hold only tensors and
plain Python values (args as a dict), so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import MDError

__all__ = ["atomic_save", "load_checkpoint_file", "load_weights", "CheckpointManager"]


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
    """``last.pth.tar`` every epoch, ``model_best.pth.tar`` and the best ``--checkpoint-hist``."""

    def __init__(self, out_dir: Path, max_history: int = 10, decreasing: bool = False):
        self.out_dir = Path(out_dir)
        self.max_history = max_history
        self.decreasing = decreasing
        self.history: list[tuple[float, int]] = []  # (metric, epoch)
        self.best: tuple[float, int] | None = None

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

    def save(self, state: dict[str, Any], epoch: int, metric: float | None) -> Path:
        last = atomic_save(state, self.out_dir / "last.pth.tar")
        if metric is None or self.max_history <= 0:
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
