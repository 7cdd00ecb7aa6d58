"""Moved to :mod:`md_plugin.rundir` (the run-folder base shared by ``train_md.py`` and
``md-doctor``); this path keeps working for existing imports."""

from ..rundir import (  # noqa: F401
    LOCK_NAME,
    PHASES,
    STATE_NAME,
    RunDirBusy,
    RunDirLock,
    advance_phase,
    changed_settings,
    prepare_run_dir,
    read_phase,
)

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
