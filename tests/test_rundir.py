"""The run-folder lock and the run-folder checks (issue 13, items 2 and 7).

The "other run" is a real second process holding the lock, then SIGKILLed: the state a killed
run leaves behind (the lock file with its pid, no kernel lock) is produced, not imitated.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from md_plugin import rundir
from md_plugin.errors import ConfigError
from md_plugin.rundir import RunDirBusy, RunDirLock, prepare_run_dir

_HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.time()}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    first = RunDirLock(tmp_path).acquire()
    with pytest.raises(RunDirBusy) as e:
        RunDirLock(tmp_path).acquire()
    msg = str(e.value)
    assert f"the run folder {tmp_path} is in use by another run (pid {os.getpid()} on host" in msg
    assert "choose another --experiment" in msg and "\n" not in msg
    first.release()
    again = RunDirLock(tmp_path).acquire()  # released: free again, and nobody was taken over
    assert again.took_over is None
    again.release()


def test_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path):
    lock_file = tmp_path / rundir.LOCK_NAME
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_file)], stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {p.pid} on host {socket.gethostname()}"):
            RunDirLock(tmp_path).acquire()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert json.loads(lock_file.read_text())["pid"] == p.pid  # the killed run's record is left
    lock = RunDirLock(tmp_path).acquire()
    assert lock.took_over is not None and lock.took_over["pid"] == p.pid
    assert f"took over the lock of a run that is gone (pid {p.pid}" in lock.describe_takeover()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / rundir.LOCK_NAME
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"pid": live.pid, "host": host, "started": 0}))
        with pytest.raises(RunDirBusy, match=f"pid {live.pid} on host {host}.*delete"):
            RunDirLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    lock_file.write_text(json.dumps({"pid": 99999999, "host": "elsewhere", "started": 0}))
    with pytest.raises(RunDirBusy, match="on host elsewhere"):
        RunDirLock(tmp_path).acquire()  # another machine's pid cannot be checked: refuse
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": host, "started": 0}))
    lock = RunDirLock(tmp_path).acquire()
    assert lock.took_over["pid"] == dead.pid
    lock.release()


def test_run_folder_that_is_a_file_or_unwritable_is_one_error(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(
        ConfigError, match=f"cannot use {f / 'exp'} as the run folder: {f} is a file"
    ):
        prepare_run_dir(f / "exp")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        try:
            with pytest.raises(ConfigError, match="cannot create the run folder"):
                prepare_run_dir(ro / "exp")
        finally:
            ro.chmod(0o700)
    assert prepare_run_dir(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("started", ["yesterday", 1e300, -5, [1], True, None])
def test_lock_record_with_a_garbled_start_time_is_one_line(tmp_path, started):
    """Issue 19 item 8: a lock file whose ``started`` is not a time (edited, or written by
    something else) was a TypeError traceback; the holder is still named, the time reads "?"."""
    import fcntl

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_file = tmp_path / rundir.LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held (by this test) for the record of another pid
        record = {"pid": gone.pid, "host": socket.gethostname(), "started": started}
        os.write(fd, json.dumps(record).encode())
        with pytest.raises(RunDirBusy) as e:
            RunDirLock(tmp_path).acquire()
        assert f"(pid {gone.pid} on host {socket.gethostname()}, started ?)" in str(e.value)
    finally:
        os.close(fd)
    # the holder is gone: taken over, and the take-over line is one line too
    lock = RunDirLock(tmp_path).acquire()
    assert lock.describe_takeover().endswith("started ?)")
    lock.release()


def test_lock_record_with_a_process_group_pid_is_stale(tmp_path, monkeypatch):
    """A pid of 0 or below names a process group (``kill(0, 0)`` always succeeds): not a run."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    host = socket.gethostname()
    for pid in (0, -1, 2**80):
        (tmp_path / rundir.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host}))
        lock = RunDirLock(tmp_path).acquire()
        lock.release()


def test_old_import_path_is_the_same_lock():
    from md_plugin.train import rundir as old

    assert old.RunDirLock is RunDirLock and old.read_phase is rundir.read_phase
