"""md_plugin.checkpoint: the neutral checkpoint I/O, its hashes and readable errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from md_plugin import checkpoint as ck
from md_plugin.errors import MDError


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
