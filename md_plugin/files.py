"""Atomic file writes: a kill, a full disk or a second writer never leaves a torn file.

Every file is written to a temporary name in the same folder, fsynced and renamed into place
(``os.replace`` is atomic within one file system). The temporary name is unique per writer (pid
and a random token), so concurrent writers never share one, and it is created with mode 0666
minus the umask like any other output (``tempfile.mkstemp`` would make it 0600). A failed write
(disk full, quota, read-only folder) is one ``MDError`` naming the file; the previous file is
untouched and the temporary file removed.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MDError

__all__ = ["atomic_write", "atomic_write_text"]


@contextmanager
def _atomic_file(path: str | Path) -> Iterator[Any]:
    """Yield a binary file object that becomes ``path`` only when the block succeeds.

    The temp file is removed on any failure (an exception, KeyboardInterrupt included).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MDError(f"cannot create the folder {path.parent}: {e.strerror or e}") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    except OSError as e:
        raise MDError(f"cannot write {path}: {_write_error_text(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if isinstance(e, RuntimeError) and not _is_write_error(e):
            raise
        raise MDError(
            f"cannot write {path}: {_write_error_text(e)}; nothing was replaced"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_write_error(e: RuntimeError) -> bool:
    text = str(e)
    return (
        "PytorchStreamWriter" in text or "file write failed" in text or "inline_container" in text
    )


def _write_error_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"{e.strerror} (disk full or over quota?)"
        return e.strerror or str(e)
    return "the write failed (disk full or over quota?)"


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Write a file atomically: ``write(f)`` fills a temp file that is then renamed into place.

    Args:
        path: The file to write; its folder is created.
        write: Writes the content to the binary file object it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MDError: One line when the file cannot be written (the previous file is untouched).
    """
    with _atomic_file(path) as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text (summary.csv, args.yaml, JSON) written like a checkpoint: temp, fsync, rename.

    Args:
        path: The file to write; its folder is created.
        text: The content, written as UTF-8.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MDError: One line when the file cannot be written (the previous file is untouched).
    """
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
