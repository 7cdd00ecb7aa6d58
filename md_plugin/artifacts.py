"""The one reader and writer of md_plugin's safetensors artifacts (diagnoses, split modules).

An artifact is a safetensors file: named tensors, plus string metadata holding a ``format``
tag, an integer format ``version`` and any number of JSON values. Writing goes through
:func:`md_plugin.files.atomic_write` (unique temporary name, fsync, rename), so a failed write
never leaves a torn file. Reading checks the tag and the version before the tensors, and maps
every way a file can be wrong (missing, a folder, truncated, another format, a newer version,
bad JSON, a missing entry) to one ``MDError`` line that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import MDError
from .files import atomic_write

__all__ = ["Artifact", "load_artifact", "reading_artifact", "save_artifact"]

T = TypeVar("T")

# format tag -> the word a message uses for it
KINDS = {"md_plugin.diagnosis": "diagnosis", "md_plugin.splitter.modules": "modules"}
# what a damaged or foreign file makes the reader or a decoder raise (JSONDecodeError and
# UnicodeDecodeError are ValueErrors)
READ_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError)


@dataclass
class Artifact:
    """An artifact as read: its tensors, its JSON metadata (decoded) and its format version."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    version: int


def save_artifact(
    path: str | Path,
    kind: str,
    version: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> Path:
    """Write an artifact atomically.

    Args:
        path: The file to write; its folder is created.
        kind: The format tag (e.g. ``"md_plugin.diagnosis"``).
        version: The format version, checked by :func:`load_artifact`.
        tensors: Name -> tensor (made contiguous and moved to the CPU).
        meta: Name -> any JSON-serialisable value (``format``/``version`` are reserved).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MDError: One line when the file cannot be written (the previous file is untouched).
    """
    header = {"format": kind, "version": str(int(version))}
    clash = set(header) & set(meta)
    if clash:
        raise ValueError(f"reserved metadata keys {sorted(clash)}")
    metadata = {**header, **{k: json.dumps(v) for k, v in meta.items()}}
    data = safetensors_bytes(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata
    )
    return atomic_write(path, lambda f: f.write(data))


@contextmanager
def reading_artifact(path: str | Path, what: str) -> Iterator[None]:
    """Map any read or decode error inside the block to one ``MDError`` line naming ``path``.

    Args:
        path: The file being read (for the message).
        what: The word for the artifact (``"diagnosis"``, ``"modules"``).
    """
    try:
        yield
    except READ_ERRORS as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise MDError(
            f"cannot read {what} {path}: corrupt or not a {what} file ({reason})"
        ) from None


def load_artifact(
    path: str | Path,
    kind: str,
    what: str,
    build: Callable[[Artifact], T] | None = None,
    *,
    max_version: int = 1,
) -> T | Artifact:
    """Read an artifact, check its tag and version, and optionally decode it.

    Args:
        path: The file to read.
        kind: The format tag it must carry.
        what: The word for it in messages (``"diagnosis"``, ``"modules"``).
        build: Turns the :class:`Artifact` into the caller's object; its ``KeyError``,
            ``ValueError`` or ``TypeError`` (a missing or malformed entry) become the same
            one-line error as a damaged file.
        max_version: The newest format version this code reads (older ones are passed on,
            ``build`` sees :attr:`Artifact.version`).

    Returns:
        ``build(artifact)``, or the :class:`Artifact` when ``build`` is None.

    Raises:
        MDError: One line for a missing file, a folder, a damaged or foreign file, or a version
            newer than ``max_version``.
    """
    path = Path(path)
    if path.is_dir():
        raise MDError(f"{what} file {path} is a folder, not a file")
    if not path.is_file():
        raise MDError(f"{what} file not found: {path}")
    with reading_artifact(path, what):
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            found = raw.get("format")
            if found != kind:
                other = KINDS.get(found or "")
                raise ValueError(f"a {other} file" if other else f"format tag {found!r}")
            version = int(raw.get("version", "1"))
            if version > max_version:
                raise MDError(
                    f"{what} file {path} has format version {version}, newer than this "
                    f"md_plugin reads ({max_version}): update md_plugin"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}
        art = Artifact(tensors, meta, version)
        return build(art) if build is not None else art
