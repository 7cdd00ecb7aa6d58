"""``train_md.py`` under ``accelerate launch`` (issue 19 item 5, issue 21 item 5).

- A user error prints the same one line as under ``python`` when launched as the README says
  (``-q``: accelerate's launcher otherwise wraps it in a CalledProcessError traceback), and the
  bundled ``configs/accelerate_1proc.yaml`` leaves accelerate no default to warn about.
- ``accelerate launch --num_processes 2`` without ``--multi_gpu`` starts ONE process: the run
  says so in one line, with the command that starts two.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from md_plugin.train.device import check_launch

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
QUIET_1PROC = [*LAUNCH, "-q", "--config_file", str(REPO / "configs" / "accelerate_1proc.yaml")]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_user_error_under_accelerate_launch_is_the_same_one_line(tmp_path):
    """The documented launch prints exactly what ``python train_md.py`` prints: one line."""
    args = [str(REPO / "train_md.py"), "--dataset", "torch/cifar10", "--data-dir",
            str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]  # fmt: skip
    plain = _run([sys.executable, *args], tmp_path)
    launched = _run([*QUIET_1PROC, *args], tmp_path)
    assert plain.returncode == 2 and launched.returncode == 1  # accelerate's own exit code
    lines = [ln for ln in plain.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), plain.stderr
    assert launched.stderr == plain.stderr  # no traceback, no "values were not passed"


def test_launcher_without_multi_gpu_starting_one_process_is_named(tmp_path):
    """``--num_processes 2`` without ``--multi_gpu``: accelerate's simple launcher starts one
    process (with MASTER_ADDR but no WORLD_SIZE); the run names it and the fix in one line."""
    args = [str(REPO / "train_md.py"), "--dataset", "torch/cifar10", "--data-dir",
            str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]  # fmt: skip
    r = _run([*LAUNCH, "-q", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", *args], tmp_path)  # fmt: skip
    warned = [ln for ln in r.stdout.splitlines() if "accelerate launch started 1 process" in ln]
    assert warned == [f"warning: {check_launch(_simple_launcher_env())}"], r.stdout
    assert "--multi_gpu --num_processes N" in warned[0]
    one = _run([*QUIET_1PROC, *args], tmp_path)
    assert "started 1 process" not in one.stdout  # one process asked, one started


def _simple_launcher_env() -> dict[str, str]:
    return {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize(
    "env, warns",
    [
        (_simple_launcher_env(), True),  # accelerate launch --num_processes 2 (no --multi_gpu)
        ({"ACCELERATE_MIXED_PRECISION": "no"}, False),  # accelerate launch, one process
        ({**_simple_launcher_env(), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False),  # torchrun
        ({**_simple_launcher_env(), "OMPI_COMM_WORLD_SIZE": "2"}, False),  # --mpirun_hostfile
        ({"MASTER_ADDR": "10.0.0.1"}, False),  # python train_md.py on a cluster node
    ],
)
def test_check_launch(env, warns):
    assert (check_launch(env) is not None) == warns
