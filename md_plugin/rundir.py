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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import broadcast_object_list

from .errors import ConfigError, MDError
from .files import atomic_write_text

__all__ = [
    "LOCK_NAME",
    "PHASES",
    "STATE_NAME",
    "RunDirBusy",
    "RunDirLock",
    "RunPlan",
    "advance_phase",
    "changed_settings",
    "finished_message",
    "is_run_dir",
    "lock_run_dir",
    "output_dir",
    "plan_run",
    "prepare_run_dir",
    "read_phase",
    "run_dir_of",
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


# ----------------------------------------------------------------------------------------------
# the trainer's run folder: where a command writes, and whether it starts, continues or stops
# ----------------------------------------------------------------------------------------------
DEFAULT_OUTPUT = "./output/train"


def is_run_dir(path: Path) -> bool:
    """A folder that a ``train_md.py`` run wrote (it has a phase file or an ``args.yaml``)."""
    return read_phase(path) is not None or (path / "args.yaml").is_file()


def run_dir_of(path: Path) -> Path:
    """The run a ``--resume`` path belongs to: a run folder itself, a checkpoint's folder, or
    for the quickstart's ``<run>/baseline/...`` the run around the baseline."""
    path = path.resolve()
    folder = path if path.is_dir() else path.parent
    if folder.name == "baseline" and read_phase(folder.parent) is not None:
        return folder.parent
    return folder


def output_dir(args: Any) -> Path:
    """The run folder of a ``train_md.py`` command (the path only; nothing is created).

    ``--output``/``--experiment`` name it. Without ``--experiment``, ``--resume`` continues in
    the resumed run's own folder (a resume never starts a second folder; issue 19), and a fresh
    run gets ``<output>/<date-time>-<model>``, with ``-1``, ``-2``... when that is taken.
    """
    if args.resume and not args.experiment:
        run = run_dir_of(Path(args.resume))
        if not args.output or is_run_dir(run):
            return run
    root = Path(args.output or DEFAULT_OUTPUT)
    if args.experiment:
        return root / args.experiment
    name = "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), args.model.replace("/", "_")])
    path, n = root / name, 0
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return path


def lock_run_dir(args: Any, acc: Any = None) -> tuple[Path, RunDirLock | None]:
    """Choose, create and lock the run folder; ``(folder, lock)``, the lock on the main process.

    With several processes (``acc`` an ``accelerate.Accelerator``) the main process decides and
    the others follow: they get its folder (a timestamp read on each rank could differ) and stop
    with its error, so no rank waits forever for one that gave up.
    """
    many = acc is not None and acc.num_processes > 1
    is_main = acc is None or acc.is_main_process
    out, lock, err = None, None, None
    if is_main:
        try:
            if args.resume and not Path(args.resume).exists():
                raise ConfigError(f"checkpoint not found: {args.resume}")
            out = output_dir(args)
            prepare_run_dir(out)
            lock = RunDirLock(out).acquire()
        except MDError as e:
            if not many:
                raise
            err = str(e)
    if many:
        box = [err, str(out) if out is not None else None]
        broadcast_object_list(box)
        err, out = box[0], Path(box[1]) if box[1] is not None else None
    if err:
        raise MDError(err)
    return Path(out), lock


@dataclass
class RunPlan:
    """What a command does with its run folder (see :func:`plan_run`)."""

    phase: str | None  # run_state.json's phase before this command; None: a new run
    finished: bool = False  # --resume of a run that already finished: nothing to do
    continuing: bool = False  # the same command again: it continues the unfinished run


def plan_run(args: Any, out: Path) -> RunPlan:
    """Fresh run, continuation of an unfinished one, or refusal; call it under the folder's lock.

    The same command again continues an unfinished run (its settings must match args.yaml);
    ``--resume`` continues from ``last.pth.tar`` (or from a run folder, or from the quickstart's
    baseline checkpoint, which means "continue the run around it"). A finished run is refused
    without ``--resume`` and reported as finished with it. Sets ``args.resume`` to the checkpoint
    to load (``""``: none yet, the run starts over in its folder).
    """
    phase = read_phase(out)
    last = out / "last.pth.tar"
    if args.resume:
        given = Path(args.resume).resolve()
        here = run_dir_of(given) == out.resolve()
        in_baseline = here and not given.is_dir() and given.parent != out.resolve()
        if given.is_dir() and not here:  # another run's folder: start from its last checkpoint
            args.resume = str(given / "last.pth.tar")
            if not (given / "last.pth.tar").is_file():
                raise MDError(f"nothing to resume in {given}: no last.pth.tar")
        elif given.is_dir() or in_baseline:  # this run folder, or the quickstart baseline's file
            if not last.is_file() and phase is None:
                raise MDError(f"nothing to resume in {out}: no last.pth.tar and no run state")
            args.resume = str(last) if last.is_file() else ""
        return RunPlan(phase, finished=phase == "done")
    if phase is None:
        if (out / "summary.csv").exists():
            raise ConfigError(
                f"{out} already holds a run (summary.csv); resume it with --resume {last} "
                "or choose another --experiment"
            )
        return RunPlan(None)
    if phase == "done":
        raise ConfigError(
            f"{out} already holds a run (finished); choose another --experiment "
            f"(--resume {out} only reports it finished)"
        )
    changed = changed_settings(out, args)
    if changed:
        raise ConfigError(
            f"{out} holds an unfinished run with other settings ({', '.join(changed[:6])}); "
            f"continue it with --resume {out} or choose another --experiment"
        )
    args.resume = str(last) if last.is_file() else ""
    return RunPlan(phase, continuing=True)


def finished_message(out: Path) -> str:
    """What ``--resume`` of a finished run says."""
    report = ", report/" if (out / "report").is_dir() else ""
    return f"{out}: this run is already finished (summary.csv, last.pth.tar{report}); nothing to do"
