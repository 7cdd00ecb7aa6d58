"""The md-doctor front ends: one set of model/data flags, a help line per flag, safe writes.

Issue 20 item 2 (one flag set and loader builder for ``md-doctor diagnose|sift-low|report``,
``split`` and ``patch``), issue 21 item 4 (``--help`` that helps) and issue 19 item 4
(``md-doctor`` writes like ``train_md.py``: a read-only or full disk is one line, no partial
output, a second command on a locked folder is refused, a failed split leaves nothing that
blocks its retry).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
import timm
import torch

import md_plugin  # noqa: F401  (registers the CIFAR nets)
from md_plugin.cli import create_parser, main
from md_plugin.config import KwargsAction
from md_plugin.rundir import LOCK_NAME, RunDirLock
from md_plugin.splitter.cli import create_split_parser
from md_plugin.splitter.patch_cli import create_patch_parser


def _chmod_blocks_writes() -> bool:
    """Whether a read-only folder refuses a new file here (not for root with its capabilities)."""
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o500)
        try:
            Path(d, "probe").touch()
        except PermissionError:
            return True
        finally:
            os.chmod(d, 0o700)
    return False


needs_non_root = pytest.mark.skipif(
    not _chmod_blocks_writes(), reason="this user writes into read-only folders (root)"
)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = create_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = {"md-doctor": top, **{f"md-doctor {k}": p for k, p in sub.choices.items()}}
    out["md-doctor split"] = create_split_parser()  # the parsers behind `split` and `patch`
    out["md-doctor patch"] = create_patch_parser()
    return out


def _one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- flags and help --------------------------------------------------------------------------


def test_every_md_doctor_flag_has_a_help_line_with_its_default():
    for name, parser in _parsers().items():
        for act in parser._actions:
            if isinstance(act, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert act.help and act.help.strip() and act.help != argparse.SUPPRESS, (
                f"{name} {act.option_strings}"
            )
    text = " ".join(_parsers()["md-doctor diagnose"].format_help().split())
    assert "(default: 50)" in text and "(default: last_conv)" in text
    assert "--model MODEL" in text and "(default: unset)" in text  # --num-classes
    split = " ".join(_parsers()["md-doctor split"].format_help().split())
    assert "GA generations (default: " in split and "(default: torch/cifar10)" in split


def test_the_front_ends_share_one_set_of_model_and_data_flags():
    p = _parsers()
    shared = ("--dataset", "--data-dir", "--input-size", "--batch-size", "--workers")
    for flag in shared:
        kinds = set()
        for name in ("md-doctor diagnose", "md-doctor sift-low", "md-doctor report",
                     "md-doctor split", "md-doctor patch"):  # fmt: skip
            act = p[name]._option_string_actions[flag]
            kinds.add((type(act), act.nargs, act.type, act.help))
        assert len(kinds) == 1, (flag, kinds)
    for name in ("md-doctor diagnose", "md-doctor split"):
        act = p[name]._option_string_actions["--model-kwargs"]
        assert isinstance(act, KwargsAction)


def test_a_bad_flag_is_one_line_naming_the_subcommand(capsys):
    assert main(["diagnose", "--model", "resnet20_cifar"]) == 2  # no --checkpoint
    line = _one_error(capsys)
    assert "--checkpoint" in line and "(see md-doctor diagnose --help)" in line
    argv = ["diagnose", "--model", "resnet20_cifar", "--checkpoint", "c.pth", "--model-kwargs", "x"]
    assert main(argv) == 2
    assert "--model-kwargs expects key=value pairs, got 'x'" in _one_error(capsys)
    assert main([]) == 2
    _one_error(capsys)


# ---- diagnose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("simcnn_weak", num_classes=10, width=8)
    path = tmp_path_factory.mktemp("front") / "m.pth.tar"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _diagnose_argv(root, ckpt, out):
    return ["diagnose", "--model", "simcnn_weak", "--model-kwargs", "width=8", "--checkpoint",
            str(ckpt), "--dataset", "torch/cifar10", "--data-dir", str(root), "--per-class", "1",
            "--out", str(out)]  # fmt: skip


@pytest.fixture
def disk_full_for(monkeypatch):
    """Make the fsync of a file whose name holds ``part`` fail as on a full disk."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd")
    real = os.fsync

    def arm(part: str) -> None:
        def fsync(fd: int) -> None:
            if part in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return arm


@needs_non_root
def test_diagnose_into_a_read_only_folder_is_one_line_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:  # model and data do not exist: the output is checked first
        assert main(_diagnose_argv(tmp_path / "nowhere", tmp_path / "none.pth", ro / "d")) == 2
        assert "not writable" in _one_error(capsys)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_diagnose_on_a_full_disk_is_one_line_and_leaves_no_file(
    cifar10_root, ckpt, tmp_path, capsys, disk_full_for
):
    out = tmp_path / "d.safetensors"
    disk_full_for("d.safetensors")
    assert main(_diagnose_argv(cifar10_root, ckpt, out)) == 2
    line = _one_error(capsys)
    assert f"cannot write {out}" in line and "disk full" in line
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file


# ---- split -------------------------------------------------------------------------------------


def _split_argv(root, ckpt, out, *extra):
    return ["split", "--model", "simcnn_weak", "--model-kwargs", "width=8", "--checkpoint",
            str(ckpt), "--dataset", "torch/cifar10", "--data-dir", str(root), "--val-from-train",
            "0.5", "--min-confidence", "0", "--population", "4", "--generations", "1",
            "--val-images", "15", "--init-ratios", "0.5", "--calibrate", "none", "--output",
            str(out), "--experiment", "run", "--no-progress", *extra]  # fmt: skip


def test_split_with_a_class_twice_says_so(cifar10_root, ckpt, tmp_path, capsys):
    assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "0", "0", "1")) == 2
    line = _one_error(capsys)
    assert "--classes lists 0 more than once" in line and "distinct" not in line
    assert not (tmp_path / "run").exists()
    assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "3")) == 2
    assert "at least two classes" in _one_error(capsys)


def test_a_failed_split_leaves_no_folder_that_blocks_its_retry(cifar10_root, ckpt, tmp_path,
                                                               capsys):  # fmt: skip
    """The class range is known only after the data is read, inside the run folder: the folder
    made for the failed split goes again, so the retry runs and --resume says why it cannot."""
    assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "0", "12")) == 2
    assert "out of range" in _one_error(capsys)
    assert not (tmp_path / "run").exists()
    assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "0", "12", "--resume")) == 2
    assert "no search state" in _one_error(capsys)
    assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "0", "1")) == 0
    assert (tmp_path / "run" / "modules.safetensors").is_file()


def test_a_second_split_resume_on_one_folder_is_refused(cifar10_root, ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "search_state.pt").write_bytes(b"state of the first split")
    with RunDirLock(run):  # the first `split --resume` holds the folder
        assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--resume")) == 2
    assert "is in use by another run" in _one_error(capsys)
    assert (run / "search_state.pt").read_bytes() == b"state of the first split"  # untouched
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "search_state.pt"]


def test_split_on_a_full_disk_is_one_line_and_leaves_nothing(cifar10_root, ckpt, tmp_path,
                                                             capsys, disk_full_for):  # fmt: skip
    disk_full_for("args.yaml")
    assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "0", "1")) == 2
    line = _one_error(capsys)
    assert f"cannot write {tmp_path / 'run' / 'args.yaml'}" in line and "disk full" in line
    assert list(tmp_path.iterdir()) == []  # no 0-byte args.yaml, no .tmp, no folder


@needs_non_root
def test_split_into_a_read_only_folder_is_one_line(cifar10_root, ckpt, tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main(_split_argv(cifar10_root, ckpt, tmp_path, "--classes", "0", "1")) == 2
        assert "run folder" in _one_error(capsys)
        assert list(tmp_path.iterdir()) == []
    finally:
        tmp_path.chmod(0o700)


# ---- masks -------------------------------------------------------------------------------------


def _annotations(folder: Path) -> Path:
    folder.mkdir()
    doc = {"version": "6.3.1", "flags": {}, "imagePath": "000004.png", "imageData": None,
           "imageHeight": 10, "imageWidth": 10,
           "shapes": [{"label": "fg", "points": [[0, 0], [1, 1]], "group_id": None,
                       "shape_type": "rectangle", "flags": {}}]}  # fmt: skip
    (folder / "000004.json").write_text(json.dumps(doc))
    return folder


def test_masks_take_the_folder_lock_and_a_full_disk_is_one_line(tmp_path, capsys, disk_full_for):
    pytest.importorskip("labelme")
    ann, out = _annotations(tmp_path / "ann"), tmp_path / "masks"
    out.mkdir()
    with RunDirLock(out):  # another `md-doctor masks` is writing this folder
        assert main(["masks", "--annotations", str(ann), "--out", str(out)]) == 2
    assert "is in use by another run" in _one_error(capsys)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    disk_full_for("000004.png")
    fresh = tmp_path / "fresh"
    assert main(["masks", "--annotations", str(ann), "--out", str(fresh)]) == 2
    line = _one_error(capsys)
    assert "000004.png" in line and "disk full" in line
    assert not fresh.exists()  # nothing was written: no folder either


@needs_non_root
def test_masks_into_a_read_only_folder_is_one_line(tmp_path, capsys):
    ann, ro = _annotations(tmp_path / "ann"), tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["masks", "--annotations", str(ann), "--out", str(ro / "m")]) == 2
        assert "not writable" in _one_error(capsys)
    finally:
        ro.chmod(0o700)


# ---- patch -------------------------------------------------------------------------------------


@needs_non_root
def test_patch_into_a_read_only_folder_is_one_line_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    argv = ["patch", "--weak-model", "simcnn_weak", "--weak-checkpoint", "w.pth",
            "--strong-model", "resnet20_cifar", "--strong-checkpoint", "s.pth",
            "--modules", "m.safetensors", "--module-class", "0", "--out", str(ro / "p.pth.tar"),
            "--results", str(ro / "r.json")]  # fmt: skip
    try:  # the checkpoints do not exist: the outputs are checked first
        assert main(argv) == 2
        assert "not writable" in _one_error(capsys)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)
