"""Hostile files and values outside the trainer's command line (issue 13, items 5, 7 and 8).

Damaged CIFAR pickles, labelme JSON with absurd sizes or coordinates, model kwargs the CIFAR
ResNets used to drop, and mask options that were rejected only after a whole diagnosis pass.
Property-based tests (hypothesis) throw random damage at the CIFAR files and random labelme
documents at the mask converter: each either gives a well-formed result or one clear error.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from md_plugin.data.cifar import CIFAR10, CIFAR100
from md_plugin.data.fixtures import write_cifar
from md_plugin.errors import ConfigError, DataError, MDError

_quick = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# CIFAR pickles
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar_src")
    write_cifar(root, "cifar10", train_per_class=2, test_per_class=1)
    write_cifar(root, "cifar100", train_per_class=1, test_per_class=1)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _dump(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _damage(folder: Path, kind: str) -> str:
    """Damage one file of a CIFAR-10 folder; returns the file's name."""
    b = folder / "cifar-10-batches-py"
    batch = pickle.loads((b / "data_batch_2").read_bytes(), encoding="latin1")
    if kind == "truncated_batch":
        raw = (b / "data_batch_3").read_bytes()
        (b / "data_batch_3").write_bytes(raw[: len(raw) // 2])
        return "data_batch_3"
    if kind == "empty_batch":
        (b / "data_batch_3").write_bytes(b"")
        return "data_batch_3"
    if kind == "truncated_meta":
        raw = (b / "batches.meta").read_bytes()
        (b / "batches.meta").write_bytes(raw[: len(raw) // 2])
        return "batches.meta"
    if kind == "label_out_of_range":
        batch["labels"][0] = 12
    elif kind == "short_rows":
        batch["data"] = batch["data"][:, :3000]
    elif kind == "float_pixels":
        batch["data"] = batch["data"].astype(np.float64)
    elif kind == "label_count":
        batch["labels"] = batch["labels"][:-1]
    elif kind == "not_a_dict":
        batch = [1, 2, 3]
    elif kind == "foreign_object":  # a pickle that would run code when loaded
        batch = {"data": _Evil(), "labels": []}
    else:
        raise ValueError(kind)
    (b / "data_batch_2").write_bytes(_dump(batch))
    return "data_batch_2"


DAMAGE = {
    "truncated_batch": "is damaged or not a CIFAR pickle (pickle data was truncated)",
    "empty_batch": "is damaged or not a CIFAR pickle (empty file)",
    "truncated_meta": "is damaged or not a CIFAR pickle",
    "label_out_of_range": "is malformed: label 12 is outside the 10 classes",
    "short_rows": "is malformed: rows of 3000 values, expected 3072",
    "float_pixels": "is malformed: 'data' is not a 2-D uint8 array",
    "label_count": "is malformed: 3 labels for 4 images",
    "not_a_dict": "is malformed: expected a dict with 'data' and 'labels'",
    "foreign_object": "unexpected object __builtin__.print",  # protocol 2 name
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_cifar_file_is_one_data_error_naming_it(cifar_src, tmp_path, kind, capsys):
    folder = _copy(cifar_src, tmp_path / "c")
    name = _damage(folder, kind)
    with pytest.raises(DataError) as e:
        CIFAR10(folder, train=True)
    msg = str(e.value)
    assert str(folder / "cifar-10-batches-py" / name) in msg and DAMAGE[kind] in msg, msg
    assert "\n" not in msg
    assert "this must never run" not in capsys.readouterr().out


def test_damaged_cifar_through_train_md_is_one_line(cifar_src, tmp_path, capsys):
    from md_plugin.train.main import cli

    folder = _copy(cifar_src, tmp_path / "c")
    _damage(folder, "truncated_batch")
    code = cli(["--model", "resnet20_cifar", "--dataset", "torch/cifar10", "--data-dir",
                str(folder), "-b", "4", "--epochs", "1", "--workers", "0", "--no-progress",
                "--output", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR file ")
    assert not (tmp_path / "out").exists()  # refused before any output was made


def test_real_format_still_loads(cifar_src):
    """The checks accept what they should: both variants, both splits, exact labels."""
    tr = CIFAR10(cifar_src, train=True)
    te = CIFAR100(cifar_src, train=False)
    assert tr.data.shape == (20, 32, 32, 3) and tr.data.dtype == np.uint8
    assert sorted(tr.targets) == sorted(list(range(10)) * 2)
    assert len(te) == 100 and len(te.classes) == 100


_damage_ops = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
    ),  # fmt: skip
    st.tuples(st.just("random"), st.binary(max_size=300)),
    st.tuples(
        st.just("structure"),
        st.fixed_dictionaries(
            {},
            optional={
                "data": st.one_of(
                    st.none(),
                    st.integers(),
                    st.text(max_size=4),
                    st.sampled_from(["u8_3072", "u8_100", "f32_3072", "u8_1d"]),
                ),
                "labels": st.one_of(
                    st.none(),
                    st.lists(
                        st.one_of(
                            st.integers(-3, 12), st.booleans(), st.floats(), st.text(max_size=2)
                        ),
                        max_size=6,
                    ),
                ),
            },
        ),
    ),  # fmt: skip
)
_ARRAYS = {
    "u8_3072": lambda n: np.zeros((n, 3072), np.uint8),
    "u8_100": lambda n: np.zeros((n, 100), np.uint8),
    "f32_3072": lambda n: np.zeros((n, 3072), np.float32),
    "u8_1d": lambda n: np.zeros(n * 3072, np.uint8),
}


@_quick
@given(target=st.sampled_from(["data_batch_1", "test_batch", "batches.meta"]), op=_damage_ops)
def test_cifar_loader_on_damaged_files_loads_well_formed_data_or_raises_data_error(target, op):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_cifar(root, "cifar10", train_per_class=1, test_per_class=1)
        f = root / "cifar-10-batches-py" / target
        raw = bytearray(f.read_bytes())
        kind, arg = op
        if kind == "truncate":
            raw = raw[: int(arg * len(raw))]
        elif kind == "flip":
            for pos, val in arg:
                raw[min(int(pos * len(raw)), len(raw) - 1)] = val
        elif kind == "random":
            raw = bytearray(arg)
        else:
            obj = dict(arg)
            if isinstance(obj.get("data"), str) and obj["data"] in _ARRAYS:
                obj["data"] = _ARRAYS[obj["data"]](len(obj.get("labels") or []))
            raw = bytearray(_dump(obj))
        f.write_bytes(bytes(raw))
        for train in (True, False):
            try:
                ds = CIFAR10(root, train=train)
            except DataError as e:
                assert "\n" not in str(e) and str(root) in str(e)
                continue
            n = len(ds.targets)
            assert ds.data.shape == (n, 32, 32, 3) and ds.data.dtype == np.uint8
            assert all(isinstance(t, int) and 0 <= t < 10 for t in ds.targets)
            assert len(ds.classes) == 10 and all(isinstance(c, str) for c in ds.classes)


# ------------------------------------------------------------------------------------------
# labelme JSON
# ------------------------------------------------------------------------------------------
labelme = pytest.importorskip("labelme")


def _doc(shapes, h=32, w=32) -> dict:
    return {"version": "5", "shapes": shapes, "imageHeight": h, "imageWidth": w}


def _poly(pts, kind="polygon", label="fg") -> dict:
    return {"label": label, "points": pts, "shape_type": kind}


def test_labelme_absurd_size_and_coordinates_are_skipped_with_reasons(tmp_path):
    from md_plugin.annotate import labelme_to_masks

    ann = tmp_path / "ann"
    ann.mkdir()
    ok = [[1, 1], [10, 1], [10, 10]]
    docs = {
        "000001": json.dumps(_doc([_poly(ok)], h=1_000_000, w=1_000_000)),
        "000002": json.dumps(_doc([_poly([[1, 1], [10, 1], [10, float("nan")]])])),
        "000003": json.dumps(_doc([_poly([[1, 1], [float("inf"), 1], [10, 10]])])),
        "000004": json.dumps(_doc([_poly([[1, 1], [1e300, 1], [10, 10]])])),
        "000005": json.dumps(_doc([_poly(ok)])).replace("10]", "1" + "0" * 400 + "]", 1),
        "000006": json.dumps(_doc([_poly([[-5, -5], [40, -5], [40, 40]]), _poly(ok)])),  # kept
    }
    for stem, text in docs.items():
        (ann / f"{stem}.json").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = labelme_to_masks(ann, tmp_path / "masks")
    assert rep.written == [6]
    reasons = dict(rep.skipped)
    assert "over the 89478485 pixel limit" in reasons["000001.json"]
    assert all(reasons[f"00000{i}.json"] == "no valid shape" for i in (2, 3, 4, 5))
    shape_reasons = " | ".join(r for _, r in rep.skipped_shapes)
    assert "point (10.0, nan) is not finite" in shape_reasons
    assert "point (inf, 1.0) is not finite" in shape_reasons
    assert "point (1e+300, 1) is far outside the 32x32 image" in shape_reasons
    assert "a point coordinate is too large" in shape_reasons


_coord = st.one_of(
    st.integers(-40, 80),
    st.floats(-40, 80),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 10**400]),
)
_size = st.one_of(st.integers(1, 40), st.sampled_from([0, -3, 10**7, 10**400, 2.5, True, "32"]))
_shape = st.fixed_dictionaries(
    {"points": st.lists(st.lists(_coord, min_size=2, max_size=2), max_size=5)},
    optional={
        "shape_type": st.sampled_from(
            [
                "polygon",
                "rectangle",
                "circle",
                "line",
                "linestrip",
                "point",
                "oriented_rectangle",
                "blob",
                None,
            ]
        ),  # fmt: skip
        "label": st.sampled_from(["fg", "bg", None, 3]),
    },
)
_labelme_doc = st.fixed_dictionaries(
    {"shapes": st.lists(_shape, max_size=3), "imageHeight": _size, "imageWidth": _size}
)


@_quick
@given(docs=st.lists(_labelme_doc, min_size=1, max_size=3))
def test_labelme_converter_writes_sane_masks_or_skips_with_a_reason(docs):
    from md_plugin.annotate import labelme_to_masks

    with tempfile.TemporaryDirectory() as d:
        ann, out = Path(d) / "ann", Path(d) / "masks"
        ann.mkdir()
        for i, doc in enumerate(docs):
            (ann / f"{i:06d}.json").write_text(json.dumps(doc))  # NaN/Infinity literals too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = labelme_to_masks(ann, out)
        assert sorted(rep.written) + sorted(int(f[:6]) for f, _ in rep.skipped) == list(
            range(len(docs))
        )
        from PIL import Image

        for i in rep.written:
            doc = docs[i]
            with Image.open(out / f"{i:06d}.png") as img:
                m = np.asarray(img)
            assert m.shape == (doc["imageHeight"], doc["imageWidth"]) and (m == 255).any()
            finite = [
                s for s in doc["shapes"]
                if all(isinstance(v, float | int) and abs(v) < 1e9 and v == v
                       for p in s["points"] for v in p)
            ]  # fmt: skip
            assert finite, "a mask was drawn from a shape with non-finite or absurd points"


# ------------------------------------------------------------------------------------------
# model kwargs and mask options
# ------------------------------------------------------------------------------------------
def test_cifar_resnet_applies_drop_path_and_batchnorm_kwargs():
    import timm

    import md_plugin.models  # noqa: F401

    m = timm.create_model("resnet20_cifar", num_classes=10, drop_path_rate=0.2,
                          bn_momentum=0.25, bn_eps=1e-3)  # fmt: skip
    rates = [float(getattr(b.drop_path, "drop_prob", 0.0)) for s in (m.layer1, m.layer2, m.layer3)
             for b in s]  # fmt: skip
    assert rates == pytest.approx([0.2 * i / 8 for i in range(9)])  # linear 0 -> rate, as timm
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert all(b.momentum == 0.25 and b.eps == 1e-3 for b in bns)
    # the momentum is really used: one train-mode batch moves running_mean by 0.25 x batch mean
    x = torch.randn(6, 3, 32, 32)
    m.train()
    m(x)
    conv_mean = m.conv1(x).mean((0, 2, 3))
    assert torch.allclose(m.bn1.running_mean, 0.25 * conv_mean.detach(), atol=1e-6)
    # drop-path is live in training (two passes differ) and off in eval (identical)
    torch.manual_seed(0)
    a = m(x)
    b = m(x)
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m(x), m(x))


def test_unknown_model_kwarg_is_refused_not_dropped():
    from md_plugin.train.args import parse_args
    from md_plugin.train.model import create_md_model

    args = parse_args(["--model", "resnet20_cifar", "--model-kwargs", "widht=8"])
    with pytest.raises(ConfigError, match="unexpected keyword argument 'widht'"):
        create_md_model(args, 10)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--theta", "2"], "theta must be in [0, 1], got 2.0"),
        (["--mask-rule", "topk", "--topk", "0"], "topk must be in [1, C] for mask rule topk"),
        (["--mask-rule", "topk"], "topk must be in [1, C] for mask rule topk, got None"),
        (["--per-class", "0"], "--per-class must be >= 1"),
    ],
)
def test_md_doctor_diagnose_checks_options_before_loading_anything(tmp_path, capsys, extra,
                                                                   expected):  # fmt: skip
    """Model and data do not exist: the option error must come first (before any work)."""
    from md_plugin.cli import main

    code = main(["diagnose", "--model", "resnet20_cifar", "--checkpoint",
                 str(tmp_path / "none.pth.tar"), "--dataset", "torch/cifar10", "--data-dir",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "d.safetensors"), *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err


def test_diagnose_refuses_bad_mask_options_before_the_pass():
    import timm

    import md_plugin.models  # noqa: F401
    from md_plugin.doctor import diagnose

    class NoPass:
        def __iter__(self):
            raise AssertionError("the diagnosis pass started")

    model = timm.create_model("resnet20_cifar", num_classes=10)
    with pytest.raises(ConfigError, match=r"topk must be in \[1, 64\]"):
        diagnose(model, NoPass(), "last_conv", 10, mask_rule="topk", topk=65,
                 input_size=(3, 32, 32))  # fmt: skip
    with pytest.raises(ConfigError, match="theta must be in"):
        diagnose(model, NoPass(), "last_conv", 10, theta=float("nan"), input_size=(3, 32, 32))


def test_any_garbage_cifar_meta_is_a_clear_error(cifar_src, tmp_path):
    folder = _copy(cifar_src, tmp_path / "c")
    meta = folder / "cifar-10-batches-py" / "batches.meta"
    rng = random.Random(0)
    for _ in range(20):
        meta.write_bytes(b"\x80\x02" + rng.randbytes(rng.randint(0, 200)))
        with pytest.raises(MDError, match="batches.meta"):
            CIFAR10(folder, train=False)
