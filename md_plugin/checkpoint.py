"""Checkpoint I/O shared by the trainer, the splitter and ``md-doctor``: read, write, hash.

Every file is written to a unique temporary name in the same folder, fsynced and renamed into
place (:mod:`md_plugin.files`), so a kill during a save leaves the previous file intact.
Checkpoints hold only tensors and plain Python values (args as a dict), so they load with
``torch.load(weights_only=True)``; timm's checkpoints (an ``argparse.Namespace`` inside) are
accepted too. The hashes name a model's weights (:func:`weights_hash`) or a file's bytes
(:func:`file_hash`), so an artifact made from one set of weights can refuse another.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors

from .errors import MDError
from .files import atomic_write

__all__ = [
    "NonFiniteCheckpoint",
    "atomic_save",
    "file_hash",
    "load_checkpoint_file",
    "load_weights",
    "non_finite_tensors",
    "state_dict_of",
    "weights_hash",
]


class NonFiniteCheckpoint(MDError):
    """The state to save holds NaN/inf: writing it would replace a good checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`md_plugin.files.atomic_write`).

    Args:
        obj: What to save (tensors and plain Python values, so it loads with weights_only).
        path: The file to write; its folder is created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def non_finite_tensors(state_dict: Mapping[str, Any] | None) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` that hold NaN or inf.

    Args:
        state_dict: Name -> value; values that are not floating-point tensors are ignored.

    Returns:
        The offending names, in the state dict's order (empty when all are finite).
    """
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
    """Read a checkpoint with ``weights_only``: a timm/md_plugin checkpoint, a bare state dict
    or a ``.safetensors`` file (returned as ``{"state_dict": ...}``).

    Args:
        path: The checkpoint file.

    Returns:
        The checkpoint's top-level dict.

    Raises:
        MDError: One line when the file is missing, a directory, not a checkpoint, damaged, or
            holds pickled objects other than tensors and plain values.
    """
    path = Path(path)
    if path.is_dir():
        inside = [n for n in ("last.pth.tar", "model_best.pth.tar") if (path / n).is_file()]
        hint = f" (did you mean {path / inside[0]}?)" if inside else ""
        raise MDError(f"checkpoint {path} is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise MDError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return {"state_dict": load_safetensors(str(path))}
        except Exception as e:  # safetensors raises several types for damaged files
            reason = " ".join(str(e).split())[:160]
            raise MDError(
                f"cannot read checkpoint {path}: not a safetensors file, or corrupt or truncated "
                f"({reason})"
            ) from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged pickle makes the unpickler raise almost any type
        raise _unreadable(path, e) from None
    if not isinstance(obj, dict):
        raise MDError(f"checkpoint {path} does not hold a state dict")
    return obj


def _unreadable(path: Path, e: Exception) -> MDError:
    """Why torch could not load ``path``, in one line and in our words.

    torch's own message advises ``weights_only=False``, which would run any code a pickle
    holds; it is not quoted. A pickle that names a class is a whole pickled object; a file in
    torch's zip or pickle format is a damaged checkpoint; anything else is not one at all.
    """
    found = _UNSUPPORTED_GLOBAL.search(str(e))
    if found and _names_a_real_global(found.group(1)):
        return MDError(
            f"cannot read checkpoint {path}: it holds a pickled {found.group(1)} object, not "
            "only tensors and plain values; load it where it was made and save its "
            "state_dict() instead"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return MDError(f"cannot read checkpoint {path}: {err.strerror or err}")
    if not head:
        return MDError(f"cannot read checkpoint {path}: the file is empty")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        return MDError(f"cannot read checkpoint {path}: corrupt or truncated (a damaged archive)")
    if head.startswith(b"\x80"):  # a pickle (torch's legacy format)
        return MDError(f"cannot read checkpoint {path}: corrupt or truncated (a damaged pickle)")
    return MDError(
        f"cannot read checkpoint {path}: not a checkpoint (neither a PyTorch nor a safetensors "
        "file)"
    )


# torch's weights_only refusal of a class the pickle names, e.g. "GLOBAL torch.nn.Linear"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*) ")


def _names_a_real_global(name: str) -> bool:
    """False for a name a truncated pickle cut short (``torch._utils._rebuild_tens``): its
    module is loaded but lacks it. Nothing is imported (a name from a file is not trusted)."""
    module, _, attr = name.rpartition(".")
    mod = sys.modules.get(module)
    return mod is None or hasattr(mod, attr)


def state_dict_of(obj: Mapping[str, Any], prefer_ema: bool = False) -> dict[str, Any]:
    """The model weights inside a checkpoint dict, without DDP's ``module.`` prefix.

    Args:
        obj: A checkpoint (``state_dict``/``model``/``state_dict_ema`` entry) or a bare state dict.
        prefer_ema: Take ``state_dict_ema`` when the checkpoint has one.

    Returns:
        Parameter/buffer name -> tensor.
    """
    keys = ("state_dict_ema", "state_dict", "model") if prefer_ema else ("state_dict", "model")
    for k in keys:
        if k in obj and isinstance(obj[k], dict):
            sd = obj[k]
            break
    else:
        sd = obj
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | Path, prefer_ema: bool = False) -> None:
    """Load model weights from a timm/md_plugin checkpoint, a bare state dict or safetensors.

    Args:
        model: The model to fill (strictly: every key must match).
        path: The checkpoint file.
        prefer_ema: Load the EMA weights when the checkpoint has them.

    Raises:
        MDError: One line when the file cannot be read or does not fit ``model``.
    """
    sd = state_dict_of(load_checkpoint_file(path), prefer_ema)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:3]
        raise MDError(
            f"checkpoint {path} does not fit this model: {' '.join(first) or str(e)[:200]}"
        ) from None


def weights_hash(weights: nn.Module | Mapping[str, Any]) -> str:
    """SHA-256 of a model's weights: every tensor's name, dtype, shape and bytes, by name.

    Two models hash alike exactly when their state dicts hold the same tensors, whatever the
    device or memory layout; values that are not tensors are left out. Used to tie an artifact
    (split modules) to the weights it was made from, which shapes alone cannot.

    Args:
        weights: A model (its ``state_dict()`` is hashed) or a state dict.

    Returns:
        The hex digest (64 characters).
    """
    sd = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)[6:]}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (a changed checkpoint hashes differently).

    Args:
        path: The file.
        chunk_size: Bytes read at a time.

    Returns:
        The hex digest (64 characters).

    Raises:
        MDError: One line when the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                h.update(block)
    except OSError as e:
        raise MDError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()
