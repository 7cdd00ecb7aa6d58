"""md_plugin.artifacts: the one safetensors reader/writer; every bad file is one MDError line."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import save_file

from md_plugin.artifacts import Artifact, load_artifact, save_artifact
from md_plugin.errors import MDError

KIND = "md_plugin.test"


def _save(path, version=1):
    tensors = {"a": torch.arange(6).view(2, 3), "b": torch.ones(2, dtype=torch.uint8)}
    return save_artifact(path, KIND, version, tensors, {"names": ["x", "y"], "opts": {"k": 1.5}})


def test_roundtrip(tmp_path):
    path = _save(tmp_path / "sub" / "a.safetensors")
    art = load_artifact(path, KIND, "test")
    assert isinstance(art, Artifact) and art.version == 1
    assert torch.equal(art.tensors["a"], torch.arange(6).view(2, 3))
    assert art.meta == {"names": ["x", "y"], "opts": {"k": 1.5}}
    got = load_artifact(path, KIND, "test", lambda a: a.meta["names"])
    assert got == ["x", "y"]
    with pytest.raises(ValueError, match="reserved"):
        save_artifact(tmp_path / "r.safetensors", KIND, 1, {}, {"version": 2})


def _one_line(fn) -> str:
    with pytest.raises(MDError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_bad_file_is_one_line(tmp_path):
    good = _save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    cases = {
        "empty": b"",
        "garbage": b"\x00\x01garbage" * 7,
        "huge header": (1 << 60).to_bytes(8, "little") + b"{}",
        "truncated": raw[: len(raw) - 5],
        "half header": raw[:20],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        msg = _one_line(lambda p=p: load_artifact(p, KIND, "test"))
        assert msg.startswith(f"cannot read test {p}: corrupt or not a test file"), name
    assert "not found" in _one_line(lambda: load_artifact(tmp_path / "nope", KIND, "test"))
    assert "is a folder" in _one_line(lambda: load_artifact(tmp_path, KIND, "test"))
    # another kind of artifact, a foreign safetensors file, bad JSON, a newer version
    save_artifact(tmp_path / "d.safetensors", "md_plugin.diagnosis", 1, {}, {})
    assert "(a diagnosis file)" in _one_line(
        lambda: load_artifact(tmp_path / "d.safetensors", KIND, "test")
    )
    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    assert "format tag None" in _one_line(
        lambda: load_artifact(tmp_path / "plain.safetensors", KIND, "test")
    )
    save_file({}, str(tmp_path / "j.safetensors"), metadata={"format": KIND, "x": "{oops"})
    assert "corrupt" in _one_line(lambda: load_artifact(tmp_path / "j.safetensors", KIND, "test"))
    newer = _save(tmp_path / "v3.safetensors", version=3)
    msg = _one_line(lambda: load_artifact(newer, KIND, "test", max_version=2))
    assert "format version 3" in msg and "update md_plugin" in msg
    assert load_artifact(newer, KIND, "test", max_version=3).version == 3
    # a decoder that misses an entry or meets a wrong type: the same line
    for build in (lambda a: a.tensors["missing"], lambda a: int(a.meta["names"])):
        assert "corrupt or not a test file" in _one_line(
            lambda build=build: load_artifact(good, KIND, "test", build)
        )


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = _save(tmp_path / "a.safetensors")
    before = path.read_bytes()

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("md_plugin.files.os.fsync", full)
    msg = _one_line(lambda: _save(path, version=2))
    assert "disk full" in msg and "nothing was replaced" in msg
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left
    assert load_artifact(path, KIND, "test").meta["names"] == ["x", "y"]
