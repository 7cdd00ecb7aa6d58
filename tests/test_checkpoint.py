"""md_plugin.checkpoint: the neutral checkpoint I/O, its hashes and readable errors."""

from __future__ import annotations

import copy
import errno
import os
import random

import pytest
import torch
import torch.nn as nn

from md_plugin import checkpoint as ck
from md_plugin.errors import MDError
from md_plugin.train.checkpoint import CheckpointManager


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_old_import_path_re_exports_the_moved_names():
    from md_plugin.train import checkpoint as old

    for name in ck.__all__:
        assert getattr(old, name) is getattr(ck, name)
    assert old._state_dict is ck.state_dict_of


def test_weights_hash_names_the_weights_not_the_object():
    a = _net()
    h = ck.weights_hash(a)
    assert len(h) == 64 and h == ck.weights_hash(a.state_dict())
    assert h == ck.weights_hash(copy.deepcopy(a))
    # the order of the entries and the memory layout do not matter
    assert h == ck.weights_hash(dict(reversed(list(a.state_dict().items()))))
    assert h == ck.weights_hash(copy.deepcopy(a).to(memory_format=torch.channels_last))
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight[0, 0, 0, 0] += 1e-6  # one value
    assert ck.weights_hash(b) != h
    c = copy.deepcopy(a)
    c[1].running_mean += 1  # buffers count: BatchNorm statistics change the outputs
    assert ck.weights_hash(c) != h
    assert ck.weights_hash(copy.deepcopy(a).double()) != h  # the dtype counts
    # the name counts, not just the bytes
    sd = a.state_dict()
    renamed = {("x" + k): v for k, v in sd.items()}
    assert ck.weights_hash(renamed) != h
    # bool, integer, empty and 0-dim tensors hash; non-tensor entries are ignored
    odd = {"b": torch.ones(3, dtype=torch.bool), "e": torch.zeros(0), "s": torch.tensor(2.0)}
    assert ck.weights_hash(odd) == ck.weights_hash({**odd, "extra": {"not": "a tensor"}})
    assert ck.weights_hash(odd) != ck.weights_hash({**odd, "s": torch.tensor(3.0)})


def test_file_hash(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 3000)
    h = ck.file_hash(p, chunk_size=1000)
    assert h == ck.file_hash(p)
    p.write_bytes(b"x" * 2999 + b"y")
    assert ck.file_hash(p) != h
    with pytest.raises(MDError, match="cannot read"):
        ck.file_hash(tmp_path / "missing.bin")


def test_state_dict_of_and_load_weights(tmp_path):
    a = _net()
    sd = {"module." + k: v for k, v in a.state_dict().items()}
    assert list(ck.state_dict_of({"state_dict": sd})) == list(a.state_dict())
    ema = {k: v + 1 for k, v in a.state_dict().items()}
    path = ck.atomic_save({"state_dict": a.state_dict(), "state_dict_ema": ema}, tmp_path / "c")
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ck.load_weights(b, path)
    assert ck.weights_hash(b) == ck.weights_hash(a)
    ck.load_weights(b, path, prefer_ema=True)
    assert ck.weights_hash(b) == ck.weights_hash(ema)
    with pytest.raises(MDError, match="does not fit this model"):
        ck.load_weights(nn.Linear(2, 2), path)


@pytest.mark.parametrize("seed", range(20))
def test_garbage_is_not_a_checkpoint_and_torch_advice_is_not_quoted(tmp_path, seed):
    """Issue 19 item 9: say what the file is; never repeat torch's "weights_only=False will
    likely succeed" (that would run whatever code the file holds)."""
    rng = random.Random(seed)
    path = tmp_path / "x.pth.tar"
    path.write_bytes(rng.randbytes(rng.randint(1, 4096)).lstrip(b"\x80P"))
    with pytest.raises(MDError) as e:
        ck.load_checkpoint_file(path)
    assert str(e.value) == (
        f"cannot read checkpoint {path}: not a checkpoint (neither a PyTorch nor a safetensors "
        "file)"
    )


def test_what_an_unreadable_checkpoint_is(tmp_path):
    def msg(path) -> str:
        with pytest.raises(MDError) as e:
            ck.load_checkpoint_file(path)
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
        return str(e.value)

    (text := tmp_path / "notes.pth").write_text("hello\n")
    assert msg(text).endswith("not a checkpoint (neither a PyTorch nor a safetensors file)")
    (empty := tmp_path / "empty.pth").write_bytes(b"")
    assert msg(empty).endswith(": the file is empty")
    good = ck.atomic_save({"state_dict": _net().state_dict()}, tmp_path / "good.pth.tar")
    (cut := tmp_path / "cut.pth.tar").write_bytes(good.read_bytes()[:600])
    assert msg(cut).endswith("corrupt or truncated (a damaged archive)")
    torch.save(_net(), tmp_path / "whole.pth")  # a pickled module, not a state dict
    assert "holds a pickled torch.nn.modules.container.Sequential object" in msg(
        tmp_path / "whole.pth"
    )
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(ck.load_checkpoint_file(legacy)["w"], torch.ones(3))
    (cut := tmp_path / "cut_legacy.pth").write_bytes(legacy.read_bytes()[:200])
    assert msg(cut).endswith("corrupt or truncated (a damaged pickle)")
    (bad := tmp_path / "bad.safetensors").write_bytes(b"nope")
    assert "not a safetensors file" in msg(bad)
    # a directory is named as one, with the checkpoint inside it as a hint
    (tmp_path / "sub").mkdir()
    assert msg(tmp_path / "sub") == (
        f"checkpoint {tmp_path / 'sub'} is a directory, not a checkpoint file"
    )
    (tmp_path / "sub" / "last.pth.tar").write_bytes(good.read_bytes())
    assert msg(tmp_path / "sub").endswith(f"(did you mean {tmp_path / 'sub' / 'last.pth.tar'}?)")
    assert msg(tmp_path / "missing.pth") == f"checkpoint not found: {tmp_path / 'missing.pth'}"


def _state(epoch: int, saver: CheckpointManager) -> dict:
    """A trainer-like checkpoint: built before the save, with the saver state of that moment."""
    return {"epoch": epoch, "state_dict": {"w": torch.full((2,), float(epoch))},
            "saver": saver.state_dict()}  # fmt: skip


def test_last_checkpoint_holds_the_saver_state_with_its_own_epoch(tmp_path):
    saver = CheckpointManager(tmp_path, max_history=2)
    saver.save(_state(0, saver), 0, 50.0)
    saver.save(_state(1, saver), 1, 60.0)
    last = ck.load_checkpoint_file(tmp_path / "last.pth.tar")
    assert last["saver"] == {"history": [[60.0, 1], [50.0, 0]], "best": [60.0, 1]}
    resumed = CheckpointManager(tmp_path, max_history=2)
    resumed.load_state_dict(last["saver"])
    resumed.save(_state(2, resumed), 2, 55.0)  # worse than epoch 1: model_best stays
    assert resumed.best == (60.0, 1)
    assert ck.load_checkpoint_file(tmp_path / "model_best.pth.tar")["epoch"] == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar", "last.pth.tar",
                     "model_best.pth.tar"]  # fmt: skip


def test_disk_full_at_model_best_keeps_the_epoch_a_candidate(tmp_path, monkeypatch):
    """Issue 19 item 9: writing model_best fails once (ENOSPC); the run continued from the
    checkpoint the message names still selects that epoch as the best."""
    real_open, failed = os.open, []

    def open_once_full(path, *a, **k):  # creating model_best's temporary file fails once
        if "model_best" in str(path) and not failed:
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    saver = CheckpointManager(tmp_path, max_history=3)
    saver.save(_state(0, saver), 0, 50.0)
    monkeypatch.setattr("md_plugin.files.os.open", open_once_full)
    with pytest.raises(MDError) as e:
        saver.save(_state(1, saver), 1, 60.0)  # the best so far: model_best is due
    assert failed and "\n" not in str(e.value)
    assert "disk full" in str(e.value) and str(e.value).endswith(
        f"The last good checkpoint is {tmp_path / 'last.pth.tar'} (epoch 0)."
    )
    assert saver.best == (50.0, 0)  # nothing half-applied in memory either
    # continue the run: resume from last.pth.tar (epoch 0), which trains epoch 1 again
    last = ck.load_checkpoint_file(tmp_path / "last.pth.tar")
    assert last["epoch"] == 0
    resumed = CheckpointManager(tmp_path, max_history=3)
    resumed.load_state_dict(last["saver"])
    resumed.save(_state(1, resumed), 1, 60.0)
    resumed.save(_state(2, resumed), 2, 55.0)
    assert resumed.best == (60.0, 1)
    assert ck.load_checkpoint_file(tmp_path / "model_best.pth.tar")["epoch"] == 1
    assert ck.load_checkpoint_file(tmp_path / "last.pth.tar")["saver"]["best"] == [60.0, 1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
