"""Every phase of a Model Doctor run can be interrupted and finished (issue 13, items 2, 3, 8).

A quickstart-style run (``--md --md-baseline-epochs 1 --epochs 1``) on a 40-image CIFAR-10
folder is stopped inside the diagnosis, inside the baseline (a real SIGTERM to the process) and
inside the report; the same command, or ``--resume`` as the error line says, must finish it
with exactly the result of the uninterrupted run. Two runs on one folder: the second is refused.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from md_plugin.rundir import LOCK_NAME, STATE_NAME
from md_plugin.train import report_hook
from md_plugin.train.checkpoint import load_checkpoint_file
from md_plugin.train.main import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from md_plugin.data.fixtures import write_cifar

    root = tmp_path_factory.mktemp("cifar_tiny")
    write_cifar(root, "cifar10", train_per_class=4, test_per_class=2)
    return root


def _argv(data: Path, out: Path, exp: str, *extra: str, md: bool = True) -> list[str]:
    argv = [
        "--model", "resnet20_cifar", "--dataset", "torch/cifar10", "--data-dir", str(data),
        "-b", "8", "--epochs", "1", "--lr", "0.02", "--warmup-epochs", "0", "--smoothing", "0",
        "--workers", "0", "--no-progress", "--output", str(out), "--experiment", exp,
        "--seed", "0", "--log-interval", "0",
    ]  # fmt: skip
    if md:
        argv += ["--md", "--md-baseline-epochs", "1", "--md-per-class", "2", "--md-alpha", "0.1"]
    return [*argv, *extra]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _phase(run: Path) -> str:
    return json.loads((run / STATE_NAME).read_text())["phase"]


def _same_result(a: Path, b: Path) -> None:
    wa = load_checkpoint_file(a / "last.pth.tar")["state_dict"]
    wb = load_checkpoint_file(b / "last.pth.tar")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _rows(a) == _rows(b)


def _one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    assert cli(_argv(data, out, "ref", "--no-md-report")) == 0
    return out / "ref"


def test_killed_during_diagnosis_the_same_command_finishes_the_run(
    data, tmp_path, reference, monkeypatch, capsys
):
    from md_plugin import doctor

    real = doctor.diagnose

    def dies(*a, **k):
        raise KeyboardInterrupt  # the process dies here (SIGKILL leaves the same files)

    monkeypatch.setattr(doctor, "diagnose", dies)
    argv = _argv(data, tmp_path, "run", "--no-md-report")
    assert cli(argv) == 130
    run = tmp_path / "run"
    assert _phase(run) == "diagnosis" and _phase(run / "baseline") == "done"
    assert not (run / "summary.csv").exists()
    monkeypatch.setattr(doctor, "diagnose", real)
    capsys.readouterr()
    assert cli(argv) == 0  # the same command: baseline reused, diagnosis and treatment done
    log = capsys.readouterr().out
    assert "continuing the unfinished run" in log and "baseline: reusing the finished" in log
    assert "== baseline" not in log  # not trained again
    assert _phase(run) == "done"
    _same_result(run, reference)
    assert [r["epoch"] for r in _rows(run / "baseline")] == ["0"]
    # resuming a finished run says so (and exits 0 without touching anything)
    before = (run / "last.pth.tar").read_bytes()
    assert cli([*argv, "--resume", str(run)]) == 0
    assert "this run is already finished" in capsys.readouterr().out
    assert (run / "last.pth.tar").read_bytes() == before
    # the same command once more: refused, nothing overwritten
    assert cli(argv) == 2
    assert f"{run} already holds a run (finished)" in _one_error(capsys)


def test_killed_during_diagnosis_the_baseline_resume_advice_finishes_the_run(
    data, tmp_path, reference, monkeypatch, capsys
):
    """The issue's case: ``--resume <run>/baseline/last.pth.tar`` used to exit 0 with no
    treatment, summary or report; it now continues the run around the baseline."""
    from md_plugin import doctor

    real = doctor.diagnose
    monkeypatch.setattr(
        doctor, "diagnose", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    argv = _argv(data, tmp_path, "run", "--no-md-report")
    assert cli(argv) == 130
    monkeypatch.setattr(doctor, "diagnose", real)
    run = tmp_path / "run"
    resume = _argv(data, tmp_path, "run", "--no-md-report")
    del resume[resume.index("--output") : resume.index("--output") + 4]  # no --output/--experiment
    assert cli([*resume, "--resume", str(run / "baseline" / "last.pth.tar")]) == 0
    assert _phase(run) == "done"
    _same_result(run, reference)


def test_sigterm_during_the_baseline_then_resume_as_told(data, tmp_path, reference, monkeypatch,
                                                         capsys):  # fmt: skip
    calls = {"n": 0}

    class SignalAtStep2(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, logits, target):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption notice
            return self.inner(logits, target)

    from md_plugin.train import recipe

    real = recipe.create_loss  # the trainer builds its loss through recipe.create_train_loss
    monkeypatch.setattr(recipe, "create_loss", lambda *a, **k: SignalAtStep2(real(*a, **k)))
    argv = _argv(data, tmp_path, "run", "--no-md-report")
    assert cli(argv) == 2
    run = tmp_path / "run"
    line = _one_error(capsys)
    assert line == (
        "error: interrupted: resumable checkpoint saved, continue with the same command plus "
        f"--resume {run}"
    )
    assert _phase(run) == "baseline"
    monkeypatch.setattr(recipe, "create_loss", real)
    assert cli([*argv, "--resume", str(run)]) == 0
    assert _phase(run) == "done"
    _same_result(run, reference)
    _same_result(run / "baseline", reference / "baseline")


@pytest.mark.slow
def test_interrupted_report_is_rebuilt_by_resume(data, tmp_path, monkeypatch, capsys):
    real = report_hook.write_treatment_report

    def second_sigterm(*a, **k):
        raise KeyboardInterrupt  # what the second SIGTERM raises

    monkeypatch.setattr(report_hook, "write_treatment_report", second_sigterm)
    argv = _argv(data, tmp_path, "run")
    assert cli(argv) == 130
    run = tmp_path / "run"
    assert _phase(run) == "report" and not (run / "report" / "report.html").exists()
    monkeypatch.setattr(report_hook, "write_treatment_report", real)
    capsys.readouterr()
    assert cli([*argv, "--resume", str(run / "last.pth.tar")]) == 0
    log = capsys.readouterr().out
    assert "nothing left to train" in log
    assert (run / "report" / "report.html").is_file() and _phase(run) == "done"
    assert [r["epoch"] for r in _rows(run)] == ["0"]  # no epoch trained twice


def test_same_command_with_other_settings_does_not_continue(data, tmp_path, monkeypatch, capsys):
    from md_plugin import doctor

    monkeypatch.setattr(
        doctor, "diagnose", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    assert cli(_argv(data, tmp_path, "run", "--no-md-report")) == 130
    capsys.readouterr()
    assert cli(_argv(data, tmp_path, "run", "--no-md-report", "--md-alpha", "0.5")) == 2
    assert "holds an unfinished run with other settings (md_alpha)" in _one_error(capsys)


@pytest.mark.slow
def test_second_run_on_the_same_folder_is_refused_while_the_first_runs(data, tmp_path, capsys):
    """Two runs at once with different seeds and lrs: the second is refused with one line and
    the first finishes untouched (it used to be silently overwritten, both exiting 0)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    first = _argv(data, tmp_path, "shared", md=False)
    first[first.index("--epochs") + 1] = "3"
    p = subprocess.Popen([sys.executable, str(REPO / "train_md.py"), *first], env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = tmp_path / "shared" / LOCK_NAME
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            if lock.exists() and str(p.pid) in lock.read_text():
                break
            time.sleep(0.02)
        assert p.poll() is None, "the first run ended before the second started"
        second = _argv(data, tmp_path, "shared", "--seed", "7", "--lr", "0.05", md=False)
        assert cli(second) == 2
        line = _one_error(capsys)
        assert f"the run folder {tmp_path / 'shared'} is in use by another run (pid {p.pid}" in line
    finally:
        _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    rows = _rows(tmp_path / "shared")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    ck = load_checkpoint_file(tmp_path / "shared" / "last.pth.tar")
    assert ck["args"]["seed"] == 0 and ck["args"]["lr"] == 0.02  # the first run's, intact


class _SignalAtCall(torch.nn.Module):
    """Wraps the training loss; sends this process a real SIGTERM at the ``at``-th call (a
    scheduler's preemption notice landing mid-epoch)."""

    def __init__(self, inner, at: int):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, logits, target):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(logits, target)


def _no_experiment(data: Path, root: Path, *extra: str) -> list[str]:
    argv = _argv(data, root, "-", "--no-md-report", *extra, md=False)
    i = argv.index("--experiment")
    return argv[:i] + argv[i + 2 :]  # a timestamped run folder under --output


def test_sigterm_during_treatment_without_experiment_resumes_in_its_folder(
    data, tmp_path, reference, monkeypatch, capsys
):
    """Issue 19 item 1: a run without --experiment (a timestamped folder), stopped by SIGTERM
    during the treatment, continued as the error line says: it continues in THAT folder (no
    second folder, the saved diagnosis reused) and ends bitwise equal to an uninterrupted run."""
    from md_plugin.train import recipe

    md = ["--md", "--md-per-class", "2", "--md-alpha", "0.1", "--initial-checkpoint",
          str(reference / "baseline" / "last.pth.tar")]  # fmt: skip
    assert cli(_no_experiment(data, tmp_path / "whole", *md)) == 0
    [whole] = list((tmp_path / "whole").iterdir())

    real = recipe.create_loss
    monkeypatch.setattr(recipe, "create_loss", lambda *a, **k: _SignalAtCall(real(*a, **k), 3))
    argv = _no_experiment(data, tmp_path / "cut", *md)
    capsys.readouterr()
    assert cli(argv) == 2
    [run] = list((tmp_path / "cut").iterdir())
    line = _one_error(capsys)
    assert line == (
        "error: interrupted: resumable checkpoint saved, continue with the same command plus "
        f"--resume {run}"
    )
    assert _phase(run) == "training"
    assert load_checkpoint_file(run / "last.pth.tar")["partial_step"] == 3
    diagnosis = (run / "diagnosis.safetensors").read_bytes()
    monkeypatch.setattr(recipe, "create_loss", real)
    assert cli([*argv, *line.split("plus ", 1)[1].split()]) == 0  # exactly what the line says
    assert list((tmp_path / "cut").iterdir()) == [run]  # no second folder
    assert _phase(run) == "done"
    assert (run / "diagnosis.safetensors").read_bytes() == diagnosis  # not diagnosed again
    _same_result(run, whole)
    # the checkpoint file instead of the folder, and the folder given as --resume: same folder
    assert cli([*argv, "--resume", str(run / "last.pth.tar")]) == 0
    assert "this run is already finished" in capsys.readouterr().out
    assert list((tmp_path / "cut").iterdir()) == [run]


def test_resume_of_a_run_folder_under_another_output_continues_that_run(
    data, tmp_path, reference, capsys
):
    """``--resume <run folder>`` with an --output that does not hold it: the run folder is the
    resumed one (it used to create a new folder and then find "nothing to resume" in it)."""
    argv = _no_experiment(data, tmp_path / "a")
    assert cli(argv) == 0
    [run] = list((tmp_path / "a").iterdir())
    capsys.readouterr()
    assert cli([*_no_experiment(data, tmp_path / "b"), "--resume", str(run)]) == 0
    assert "this run is already finished" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()


def test_non_finite_initial_checkpoint_is_refused_before_any_work(
    data, tmp_path, reference, capsys
):
    """Issue 19 item 2: a NaN --initial-checkpoint used to be diagnosed (a diagnosis of the NaN
    model was saved) before training failed, blaming the learning rate. Now: one line naming the
    tensor, and no run folder at all."""
    ck = load_checkpoint_file(reference / "baseline" / "last.pth.tar")
    ck["state_dict"]["layer2.0.bn1.running_var"][3] = float("nan")
    bad = tmp_path / "nan.pth.tar"
    torch.save(ck, bad)
    argv = _argv(data, tmp_path / "out", "nan", "--no-md-report", "--initial-checkpoint", str(bad))
    assert cli(argv) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: --initial-checkpoint {bad} holds NaN/inf in ")
    assert "layer2.0.bn1.running_var" in line
    assert not (tmp_path / "out").exists()


def test_a_changed_initial_checkpoint_is_diagnosed_again(
    data, tmp_path, reference, monkeypatch, capsys
):
    """Issue 19 item 2: an unfinished run that starts over (killed before its first checkpoint)
    reuses its saved diagnosis only while the initial checkpoint holds the same weights; after
    the file changes in place (e.g. mended), the same command diagnoses again."""
    from md_plugin.checkpoint import state_dict_of, weights_hash
    from md_plugin.doctor import Diagnosis
    from md_plugin.train import recipe

    init = tmp_path / "init.pth.tar"
    init.write_bytes((reference / "baseline" / "last.pth.tar").read_bytes())
    argv = _argv(data, tmp_path, "run", "--no-md-report", "--initial-checkpoint", str(init))
    run, real = tmp_path / "run", recipe.create_loss

    class Dies(torch.nn.Module):
        def forward(self, logits, target):
            raise KeyboardInterrupt  # killed in the first training step: no checkpoint yet

    monkeypatch.setattr(recipe, "create_loss", lambda *a, **k: Dies())
    assert cli(argv) == 130
    assert _phase(run) == "training" and not (run / "last.pth.tar").exists()
    first = (run / "diagnosis.safetensors").read_bytes()
    capsys.readouterr()
    assert cli(argv) == 130  # the same weights: the diagnosis is reused
    assert "diagnosing again" not in capsys.readouterr().out
    assert (run / "diagnosis.safetensors").read_bytes() == first

    init.write_bytes((reference / "last.pth.tar").read_bytes())  # the file changes in place
    monkeypatch.setattr(recipe, "create_loss", real)
    assert cli(argv) == 0
    assert "was made from other weights than this run starts from" in capsys.readouterr().out
    diag = Diagnosis.load(run / "diagnosis.safetensors")
    assert diag.fingerprint["weights"] == weights_hash(state_dict_of(load_checkpoint_file(init)))


def test_sigterm_during_the_diagnosis_stops_with_the_resume_line(
    data, tmp_path, reference, monkeypatch, capsys
):
    """Issue 19 item 5: a SIGTERM during the diagnosis killed the process at once (exit -15, no
    message). It is now honoured like in the other phases: one line, and the run continued as
    it says ends exactly like the uninterrupted one."""
    from md_plugin import doctor

    real = doctor.diagnose

    def preempted(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered inside the diagnosis
        return real(*a, **k)

    monkeypatch.setattr(doctor, "diagnose", preempted)
    argv = _argv(data, tmp_path, "run", "--no-md-report")
    assert cli(argv) == 2
    run = tmp_path / "run"
    assert _one_error(capsys) == (
        f"error: interrupted during the diagnosis (signal {int(signal.SIGTERM)}), which is redone "
        f"when the run continues; continue with the same command plus --resume {run}"
    )
    assert _phase(run) == "diagnosis" and not (run / "diagnosis.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back
    monkeypatch.setattr(doctor, "diagnose", real)
    assert cli([*argv, "--resume", str(run)]) == 0
    assert _phase(run) == "done"
    _same_result(run, reference)
