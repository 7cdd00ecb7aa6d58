"""No poisoned checkpoints, no torn or private files (issue 13, items 1, 7 and 8).

Skipped non-finite steps must leave no trace (BatchNorm statistics included), a checkpoint is
never written with NaN/inf inside, and every output file is written atomically with a unique
temporary name, fsynced, with the same mode as any other output.
"""

from __future__ import annotations

import os
import resource
import signal
import threading

import pytest
import torch
import torch.nn as nn

from md_plugin.errors import MDError
from md_plugin.files import atomic_write_text
from md_plugin.train.args import parse_args
from md_plugin.train.checkpoint import (
    CheckpointManager,
    NonFiniteCheckpoint,
    atomic_save,
    load_checkpoint_file,
    non_finite_tensors,
)
from md_plugin.train.engine import TrainState, running_stat_buffers, train_one_epoch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.arange(4) % 3) for _ in range(n)]


def _epoch(model: nn.Module, loader) -> TrainState:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    args = parse_args(["--log-interval", "0", "--no-progress", "--max-bad-steps", "5"])
    state = TrainState()
    train_one_epoch(0, model, loader, opt, nn.CrossEntropyLoss(), acc, args, state)
    return state


def test_skipped_steps_leave_batchnorm_statistics_untouched():
    """An epoch with NaN batches in it ends exactly where the epoch without them ends."""
    good = _batches(3)
    nan_x = torch.full((4, 3, 8, 8), float("nan"))
    inf_x = torch.full((4, 3, 8, 8), float("inf"))
    with_bad = [good[0], (nan_x, good[0][1]), good[1], (inf_x, good[0][1]), good[2]]
    a, b = _model(), _model()
    sa = _epoch(a, with_bad)
    sb = _epoch(b, good)
    assert sa.skipped_total == 2 and sa.num_updates == sb.num_updates == 3
    bufs = running_stat_buffers(a)
    assert len(bufs) == 3  # running_mean, running_var, num_batches_tracked
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # BN stats and weights: bitwise the clean epoch's
    assert int(a[1].num_batches_tracked) == 3  # the skipped forwards were not counted


def _bn_state() -> dict[str, torch.Tensor]:
    m = _model()
    return {"epoch": 0, "state_dict": m.state_dict(), "state_dict_ema": None}


def test_checkpoint_with_non_finite_state_is_never_written(tmp_path):
    saver = CheckpointManager(tmp_path, max_history=2)
    good = _bn_state()
    # nothing written yet: the abort message must not claim a checkpoint exists
    poisoned = _bn_state()
    poisoned["state_dict"]["1.running_var"][0] = float("nan")
    with pytest.raises(NonFiniteCheckpoint, match="No checkpoint was written yet"):
        saver.save(poisoned, 0, 50.0)
    assert list(tmp_path.iterdir()) == []

    saver.save(good, 0, 50.0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"last.pth.tar", "model_best.pth.tar", "checkpoint-0.pth.tar"}
    poisoned["epoch"] = 1
    with pytest.raises(NonFiniteCheckpoint) as e:
        saver.save(poisoned, 1, 90.0)  # a better metric: would also replace model_best
    msg = str(e.value)
    assert "NaN/inf after epoch 1 in 1 tensors (1.running_var)" in msg
    assert f"The last good checkpoint is {tmp_path / 'last.pth.tar'} (epoch 0)." in msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    ema = _bn_state()
    ema["state_dict_ema"] = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteCheckpoint, match=r"ema:w"):
        saver.save_partial(ema, 1)
    assert non_finite_tensors(
        {"a": torch.ones(2), "n": torch.tensor(3), "b": torch.ones(1) / 0}
    ) == ["b"]


def test_files_get_the_umask_mode_like_any_other_output(tmp_path):
    old = os.umask(0o022)
    try:
        ck = atomic_save({"a": torch.ones(1)}, tmp_path / "last.pth.tar")
        txt = atomic_write_text(tmp_path / "summary.csv", "epoch\n0\n")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (ck, txt, plain)}
    assert modes == {"last.pth.tar": 0o644, "summary.csv": 0o644, "plain.txt": 0o644}


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """Unique temp names: 4 threads rewriting one file never remove each other's temp file
    (a fixed ``.name.tmp`` raised FileNotFoundError) and the result is one complete version."""
    path = tmp_path / "summary.csv"
    errors: list[BaseException] = []
    texts = {i: f"writer {i}\n" + "x" * 20_000 * (i + 1) for i in range(4)}

    def work(i: int) -> None:
        try:
            for _ in range(40):
                atomic_write_text(path, texts[i])
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert path.read_text() in texts.values()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]  # no temp file left


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write: under a 1 MB file-size limit write() fails (EFBIG) as on a full
    disk, and torch.save reports it from inline_container.cc."""
    path = tmp_path / "last.pth.tar"
    atomic_save({"epoch": 1, "w": torch.arange(5)}, path)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        with pytest.raises(MDError) as e:
            atomic_save({"epoch": 2, "big": torch.zeros(1 << 20)}, path)  # 4 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(e.value) == (
        f"cannot write {path}: the write failed (disk full or over quota?); nothing was replaced"
    )
    ck = load_checkpoint_file(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


def test_unwritable_folder_is_one_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MDError, match=f"cannot create the folder {blocker}"):
        atomic_write_text(blocker / "run" / "args.yaml", "a: 1\n")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(MDError, match=f"cannot write {ro / 'x.txt'}: Permission denied"):
                atomic_write_text(ro / "x.txt", "x")
        finally:
            ro.chmod(0o700)
