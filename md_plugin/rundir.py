"""Run folders for every command: one run per folder (a lock), a writable folder, the run's phase.

This is the neutral base under ``train_md.py`` and the ``md-doctor`` commands (it imports
nothing from :mod:`md_plugin.train` or :mod:`md_plugin.splitter`), so every command that writes a
run folder takes the same lock and reads the same phase file.

Two runs writing the same ``--output/--experiment`` folder would interleave checkpoints and
summaries and both exit 0. The lock is ``fcntl.flock`` on ``<run>/.run.lock``: the kernel drops
it when the holder dies however it dies (SIGKILL, OOM, a crashed node's process), so a lock file
left behind by a killed run is *stale* by construction and the next run takes it over. The file
records the holder's pid, host and start time: a refused run names who holds the folder, and a
take-over says whose lock it was. Where ``flock`` is not supported (some network file systems),
the same record decides: the holder is alive if it is on this host and its pid exists; a lock
from another host is never taken over silently (delete the file if that run is gone).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, MDError
from .files import atomic_write_text

__all__ = [
    "LOCK_NAME",
    "PHASES",
    "STATE_NAME",
    "RunDirBusy",
    "RunDirLock",
    "advance_phase",
    "changed_settings",
    "prepare_run_dir",
    "read_phase",
]

LOCK_NAME = ".run.lock"


class RunDirBusy(MDError):
    """Another live run holds the run folder."""


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run folder (and parents); one clear error if that is impossible."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot use {path} as the run folder: {parent} is a file")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"the run folder {path} is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative pids name process groups, not a run
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    """Who holds the lock, from its record; a field that is not what a run writes reads "?"
    (the file may have been edited or written by something else)."""
    started = owner.get("started")
    when = "?"
    if isinstance(started, int | float) and not isinstance(started, bool) and started > 0:
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        except (OverflowError, OSError, ValueError):
            pass
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}"


class RunDirLock:
    """Exclusive use of a run folder. ``acquire`` raises :class:`RunDirBusy` when taken.

    ``took_over`` holds the record of a dead holder whose lock was taken over (else None).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            text = os.pread(self.fd, 4096, 0).decode("utf-8", "replace") if self.fd else ""
            owner = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def acquire(self) -> RunDirLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise ConfigError(
                f"cannot create the lock file {self.path}: {e.strerror or e}"
            ) from None
        owner = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner = self._read()
        except BlockingIOError:
            holder = self._read() or {}
            self._close()
            raise RunDirBusy(
                f"the run folder {self.path.parent} is in use by another run ({_describe(holder)}); "
                "wait for it to finish or choose another --experiment"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._close()
                raise
            owner = self._read()  # no flock here: decide from the record
            if owner and not self._is_stale(owner):
                self._close()
                raise RunDirBusy(
                    f"the run folder {self.path.parent} is in use by another run "
                    f"({_describe(owner)}); if that run is gone, delete {self.path}"
                ) from None
        if owner and owner.get("pid") and not self._is_self(owner):
            self.took_over = owner
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        data = json.dumps(me).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)
        return self

    @staticmethod
    def _is_self(owner: dict[str, Any]) -> bool:
        return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()

    @staticmethod
    def _is_stale(owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # cannot check a pid on another machine
        pid = owner.get("pid")
        return not (isinstance(pid, int) and not isinstance(pid, bool) and _pid_alive(pid))

    def describe_takeover(self) -> str | None:
        if self.took_over is None:
            return None
        return f"took over the lock of a run that is gone ({_describe(self.took_over)})"

    def release(self) -> None:
        """Clear the record and unlock. The file stays: removing it would let a third run lock
        a new file while a second one holds the old, unlinked one."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# the run's phase, so the same command (or --resume) can finish an interrupted run
# ----------------------------------------------------------------------------------------------
STATE_NAME = "run_state.json"
PHASES = ("baseline", "diagnosis", "training", "report", "done")

# flags that do not change what a run computes (or are set by the run itself): a re-run of the
# same command may differ in them and still continue the unfinished run
_VOLATILE = {
    "resume", "initial_checkpoint", "config", "no_progress", "log_interval", "workers", "device",
    "local_rank", "start_epoch", "output", "experiment", "data",
}  # fmt: skip


def read_phase(run_dir: str | Path) -> str | None:
    """The last phase the run in ``run_dir`` entered (``done`` when it finished), or None."""
    try:
        state = json.loads((Path(run_dir) / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    phase = state.get("phase") if isinstance(state, dict) else None
    return phase if phase in PHASES else None


def advance_phase(run_dir: str | Path, phase: str) -> None:
    """Record that the run entered ``phase``; never moves back (a resumed run re-runs setup)."""
    now = read_phase(run_dir)
    if now is not None and PHASES.index(now) >= PHASES.index(phase):
        return
    atomic_write_text(Path(run_dir) / STATE_NAME, json.dumps({"phase": phase}) + "\n")


def changed_settings(run_dir: str | Path, args: Any) -> list[str]:
    """Flags whose value differs from the run's ``args.yaml`` (empty when there is none)."""
    try:
        recorded = yaml.safe_load((Path(run_dir) / "args.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    mine = vars(args)
    out = []
    for k, v in recorded.items():
        if k in _VOLATILE or k.startswith("_") or k not in mine:
            continue
        now = list(mine[k]) if isinstance(mine[k], tuple) else mine[k]
        if k == "lr" and v is not None and now is None:
            continue  # args.yaml of a run whose lr was derived from --lr-base
        if now != v:
            out.append(k)
    return out
