"""Hostile inputs: every user mistake gives ONE error line and a non-zero exit, never a traceback.

Every case runs through ``cli`` (what ``train_md.py`` calls) and one case of each kind also
through a real ``python train_md.py`` subprocess. The cases fail before training (a corrupt
image: at the first batch), so each costs little more than the imports.
Property-based tests (hypothesis) drive the config parser and the layer-spec resolver with
random input: they either succeed with well-typed results or raise ``ConfigError``.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from md_plugin.config import KwargsAction, parser_actions
from md_plugin.errors import ConfigError, MDError
from md_plugin.train import args as args_mod
from md_plugin.train.args import create_parser, parse_args
from md_plugin.train.checkpoint import load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet20_cifar", "--epochs", "1", "--workers", "0", "--no-progress",
        "--log-interval", "0", "--lr", "0.01", "--warmup-epochs", "0", "--seed", "0"]  # fmt: skip


def _world(root: Path) -> dict[str, Path]:
    """Build every file the cases need under ``root``; returns named paths."""
    import timm

    from md_plugin.data.fixtures import write_cifar
    from md_plugin.doctor import diagnose
    from md_plugin.train.checkpoint import atomic_save

    p = {"root": root, "cifar": root / "cifar", "out": root / "out"}
    write_cifar(p["cifar"], "cifar10", train_per_class=4, test_per_class=2)

    # ImageFolder layout with one file that is not an image (8 train images, batch 4: all used)
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", 4), ("validation", 2)):
        for cls in ("cat", "dog"):
            d = root / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    # a validation folder with a class the training folder lacks (labels would shift)
    for split, classes in (("train", ("cat", "dog")), ("validation", ("cat", "dog", "eel"))):
        for cls in classes:
            d = root / "folder_extra" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )
    p["folder_extra"] = root / "folder_extra"
    bad = root / "folder" / "train" / "cat" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    p["bad_png"] = bad
    p["folder"] = root / "folder"

    model = timm.create_model("resnet20_cifar", num_classes=10)
    ck = {"epoch": 0, "arch": "resnet20_cifar", "state_dict": model.state_dict()}
    good = atomic_save(ck, root / "good.pth.tar")
    raw = good.read_bytes()
    (p_trunc := root / "truncated.pth.tar").write_bytes(raw[: len(raw) // 2])
    p["truncated"] = p_trunc
    (p_garbage := root / "garbage.pth.tar").write_bytes(random.Random(0).randbytes(4096))
    p["garbage"] = p_garbage
    p["weights_only"] = atomic_save({"state_dict": model.state_dict()}, root / "weights.pth.tar")
    other = timm.create_model("resnet32_cifar", num_classes=10)
    p["other_model"] = atomic_save({"state_dict": other.state_dict()}, root / "r32.pth.tar")

    # a diagnosis of resnet32 at a layer name resnet20 also has
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diag = diagnose(other, loader, "layer3.0.conv2", 10, per_class=2, input_size=(3, 32, 32))
    p["diag_other"] = diag.save(root / "diag_r32.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diag20 = diagnose(model, loader, "layer3.0.conv2", 10, per_class=2, input_size=(3, 32, 32))
    p["diag_r20_layer3_0"] = diag20.save(root / "diag_r20.safetensors")
    # masks that fit no training image (16x16 masks for 32x32 images)
    (p_masks := root / "masks_wrong_size").mkdir()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(p_masks / "000001.png")
    p["masks_wrong_size"] = p_masks
    # a real train_md.py checkpoint (cosine schedule) to resume
    from md_plugin.train.main import main as train_main

    res = train_main(parse_args([*_cifar(p), "--experiment", "cosine_run", "--sched", "cosine"]))
    p["cosine_ck"] = Path(res["out_dir"]) / "last.pth.tar"
    (p_file := root / "not_a_folder").write_text("x")
    p["output_is_file"] = p_file
    (p_bad_diag := root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    p["diag_corrupt"] = p_bad_diag

    def cfg(name: str, text: str) -> Path:
        f = root / f"{name}.yaml"
        f.write_text(text)
        return f

    p["cfg_alpha"] = cfg("alpha", "md:\n  alpha: -0.5\n")
    p["cfg_theta"] = cfg("theta", "md:\n  theta: high\n")
    p["cfg_imb"] = cfg("imb", "imb_ratio: abc\n")
    p["cfg_layers"] = cfg("layers", "md:\n  layers: []\n")
    p["cfg_unknown"] = cfg("unknown", "learning_rate: 0.1\n")
    p["cfg_list"] = cfg("list", "batch_size: [1, 2]\n")
    p["cfg_bool"] = cfg("bool", "epochs: true\n")
    p["cfg_choice"] = cfg("choice", "clip_mode: sideways\n")
    p["cfg_broken"] = cfg("broken", "lr: [0.1\n  b: {\n")
    p["cfg_tab"] = cfg("tab", "lr: 0.1\nmd:\n\talpha: 1\n")
    p["cfg_binary"] = root / "binary.yaml"
    p["cfg_binary"].write_bytes(b"\xff\xfe\x00garbage\x80")
    return p


def _cifar(p, *extra) -> list[str]:
    return [*TINY, "--dataset", "torch/cifar10", "--data-dir", str(p["cifar"]), "-b", "8",
            "--output", str(p["out"]), *extra]  # fmt: skip


# name -> (argv builder, expected text in the error line)
CASES = {
    "negative_alpha": (lambda p: ["--md-alpha", "-1"], "--md-alpha must be >= 0"),
    "theta_above_1": (lambda p: ["--md-theta", "1.5"], "--md-theta must be in [0, 1]"),
    "per_class_zero": (lambda p: ["--md-per-class", "0"], "--md-per-class must be >= 1"),
    "empty_layer_list": (lambda p: ["--md-layers", " , "], "--md-layers is empty"),
    "imb_ratio_not_a_number": (
        lambda p: ["--imb-ratio", "abc"],
        "argument --imb-ratio: invalid float value: 'abc'",
    ),
    "batch_size_zero": (lambda p: ["-b", "0"], "--batch-size must be >= 1"),
    "bad_choice": (lambda p: ["--clip-mode", "sideways"], "argument --clip-mode: invalid choice"),
    "unknown_flag": (lambda p: ["--learning-rate", "3"], "unrecognized arguments: --learning-rate"),
    "unsupported_timm_flag": (
        lambda p: ["--sync-bn"],
        "timm option not supported by train_md.py: --sync-bn",
    ),
    "yaml_negative_alpha": (lambda p: ["-c", str(p["cfg_alpha"])], "--md-alpha must be >= 0"),
    "yaml_theta_text": (lambda p: ["-c", str(p["cfg_theta"])], "key 'md_theta' has a bad value"),
    "yaml_imb_ratio_text": (lambda p: ["-c", str(p["cfg_imb"])], "key 'imb_ratio' has a bad value"),
    "yaml_empty_layer_list": (lambda p: ["-c", str(p["cfg_layers"])], "--md-layers is empty"),
    "yaml_unknown_key": (
        lambda p: ["-c", str(p["cfg_unknown"])],
        "1 unknown config key: 'learning_rate'",
    ),
    "yaml_list_for_int": (lambda p: ["-c", str(p["cfg_list"])], "key 'batch_size' has a bad value"),
    "yaml_bool_for_int": (lambda p: ["-c", str(p["cfg_bool"])], "key 'epochs' has a bad value"),
    "yaml_bad_choice": (lambda p: ["-c", str(p["cfg_choice"])], "key 'clip_mode' has a bad value"),
    "yaml_syntax_error": (lambda p: ["-c", str(p["cfg_broken"])], "cannot parse"),
    "yaml_not_text": (lambda p: ["-c", str(p["cfg_binary"])], "cannot read"),
    "yaml_missing": (lambda p: ["-c", str(p["root"] / "nope.yaml")], "config file not found"),
    "missing_cifar_folder": (
        lambda p: [*_cifar(p), "--data-dir", str(p["root"] / "nowhere")],
        "CIFAR10 not found",
    ),
    "missing_image_folder": (
        lambda p: [*TINY, "--data-dir", str(p["root"] / "nowhere"), "-b", "4"],
        "data folder not found",
    ),
    "unknown_model": (
        lambda p: [*_cifar(p), "--model", "resnet9000"],
        "unknown model 'resnet9000'",
    ),
    "batch_larger_than_dataset": (
        lambda p: [*_cifar(p), "-b", "64"],
        "--batch-size 64 is larger than the training set (40 images)",
    ),
    "corrupt_image_workers0": (
        lambda p: [
            *TINY,
            "--data-dir",
            str(p["folder"]),
            "-b",
            "4",
            "--output",
            str(p["out"]),
            "--input-size",
            "3",
            "32",
            "32",
        ],  # fmt: skip
        "cannot read image {bad_png}",
    ),
    "corrupt_image_workers1": (
        lambda p: [
            *TINY,
            "--data-dir",
            str(p["folder"]),
            "-b",
            "4",
            "--output",
            str(p["out"]),
            "--input-size",
            "3",
            "32",
            "32",
            "--workers",
            "1",
        ],  # fmt: skip
        "cannot read image {bad_png}",
    ),
    "resume_truncated": (
        lambda p: _cifar(p, "--resume", str(p["truncated"])),
        "cannot read checkpoint {truncated}: corrupt or truncated",
    ),
    "resume_garbage": (
        lambda p: _cifar(p, "--resume", str(p["garbage"])),
        "cannot read checkpoint {garbage}: not a checkpoint",
    ),
    "resume_missing": (
        lambda p: _cifar(p, "--resume", str(p["root"] / "nope.pth.tar")),
        "checkpoint not found",
    ),
    "resume_weights_only": (
        lambda p: _cifar(p, "--resume", str(p["weights_only"])),
        "is not a train_md.py training checkpoint",
    ),
    "resume_without_optimizer_state": (
        lambda p: _cifar(p, "--resume", str(p["root"] / "good.pth.tar")),
        "has no optimizer/scheduler state",
    ),
    "initial_checkpoint_truncated": (
        lambda p: _cifar(p, "--initial-checkpoint", str(p["truncated"])),
        "cannot read checkpoint {truncated}: corrupt or truncated",
    ),
    "initial_checkpoint_other_model": (
        lambda p: _cifar(p, "--initial-checkpoint", str(p["other_model"])),
        "does not fit this model",
    ),
    "diagnosis_corrupt": (
        lambda p: _cifar(
            p,
            "--md",
            "--md-diagnosis",
            str(p["diag_corrupt"]),
            "--initial-checkpoint",
            str(p["root"] / "good.pth.tar"),
        ),  # fmt: skip
        "cannot read diagnosis {diag_corrupt}",
    ),
    "diagnosis_of_another_model": (
        lambda p: _cifar(
            p,
            "--md",
            "--md-diagnosis",
            str(p["diag_other"]),
            "--md-layers",
            "layer3.0.conv2",
            "--initial-checkpoint",
            str(p["root"] / "good.pth.tar"),
        ),  # fmt: skip
        "diagnosis was made for a model with different parameter shapes ('resnet32_cifar', "
        "this model is 'resnet20_cifar')",
    ),
    # issue 13
    "lr_nan": (lambda p: ["--lr", "nan"], "--lr must be a positive number, got nan"),
    "lr_negative": (lambda p: ["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    "drop_above_1": (lambda p: ["--drop", "2"], "--drop must be in [0, 1), got 2.0"),
    "validation_batch_zero": (lambda p: ["-vb", "0"], "-vb/--validation-batch-size must be >= 1"),
    "md_topk_zero": (lambda p: ["--md-topk", "0"], "--md-topk must be >= 1, got 0"),
    "topk_rule_without_k": (
        lambda p: ["--md-mask-rule", "topk"],
        "--md-mask-rule topk needs --md-topk K",
    ),
    "yaml_tab": (
        lambda p: ["-c", str(p["cfg_tab"])],
        "line 3, column 1: found character '\\t' that cannot start any token (YAML does not "
        "allow tabs for indentation: use spaces)",
    ),
    "num_classes_below_labels": (
        lambda p: _cifar(p, "--num-classes", "5"),
        "the training split has 20 label(s) outside [0, 5) (e.g. 5), the class count set by "
        "--num-classes 5",
    ),
    "validation_class_missing_in_train": (
        lambda p: [
            *TINY,
            "--data-dir",
            str(p["folder_extra"]),
            "-b",
            "4",
            "--output",
            str(p["out"]),
        ],  # fmt: skip
        "split's classes differ from the training split's (3 vs 2, e.g. 'eel')",
    ),
    "unknown_model_kwarg": (
        lambda p: _cifar(p, "--model-kwargs", "widht=8"),
        "cannot create resnet20_cifar: CifarResNet.__init__() got an unexpected keyword argument 'widht'",
    ),
    "output_is_a_file": (
        lambda p: [*_cifar(p), "--output", str(p["output_is_file"])],
        "cannot use {output_is_file}/",
    ),
    "md_diagnosis_without_trained_model": (
        lambda p: _cifar(p, "--md", "--md-diagnosis", str(p["diag_r20_layer3_0"])),
        "Model Doctor treats a trained model: pass --initial-checkpoint",
    ),
    "md_diagnosis_other_layers": (
        lambda p: _cifar(
            p,
            "--md",
            "--md-diagnosis",
            str(p["diag_r20_layer3_0"]),
            "--initial-checkpoint",
            str(p["root"] / "good.pth.tar"),
        ),  # fmt: skip
        "--md-layers 'last_conv' is layer3.2.conv2, but the diagnosis",
    ),
    "md_beta_without_usable_masks": (
        lambda p: _cifar(
            p,
            "--md",
            "--md-beta",
            "0.5",
            "--md-masks",
            str(p["masks_wrong_size"]),
            "--initial-checkpoint",
            str(p["root"] / "good.pth.tar"),
        ),  # fmt: skip
        "--md-beta 0.5 needs foreground masks, but no mask in",
    ),
    "resume_with_another_sched": (
        lambda p: _cifar(p, "--resume", str(p["cosine_ck"]), "--sched", "step"),
        "was trained with --sched cosine, not step",
    ),
}


# the real ``python train_md.py`` for one case of every kind (the rest run the same ``cli``
# in process, which is all train_md.py does: ``sys.exit(cli())``)
SUBPROCESS = [
    "negative_alpha", "imb_ratio_not_a_number", "yaml_unknown_key", "missing_cifar_folder",
    "corrupt_image_workers1", "resume_truncated", "diagnosis_of_another_model",
    "lr_nan", "yaml_tab", "num_classes_below_labels", "output_is_a_file",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return _world(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def results(world):
    """Run the SUBPROCESS cases, two at a time; name -> CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(name):
        argv, _ = CASES[name]
        cmd = [sys.executable, str(REPO / "train_md.py"), *argv(world), "--experiment", name]
        return subprocess.run(cmd, env=env, cwd=world["root"], capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SUBPROCESS, pool.map(run, SUBPROCESS)))


def _check_one_line(name: str, world, code: int, stderr: str, stdout: str) -> None:
    expected = CASES[name][1].format(**{k: str(v) for k, v in world.items()})
    assert code != 0, stdout[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Train:" not in stdout and "Epoch 1/1" not in stdout  # failed before training


@pytest.mark.parametrize("name", SUBPROCESS)
def test_one_clear_error_line_from_train_md(results, world, name):
    r = results[name]
    _check_one_line(name, world, r.returncode, r.stderr, r.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_one_clear_error_line_from_cli(world, name, capsys, monkeypatch):
    from md_plugin.train.main import cli

    monkeypatch.chdir(world["root"])
    code = cli([*CASES[name][0](world), "--experiment", f"inproc_{name}"])
    out = capsys.readouterr()
    _check_one_line(name, world, code, out.err, out.out)


# ------------------------------------------------------------------------------------------
# property-based: the config parser
# ------------------------------------------------------------------------------------------
_ACTIONS = parser_actions(create_parser())

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e-3", "3", "-2", "0.5", "nan", "inf", "true", "relu", "norm", "sgd"]),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=4),
    st.dictionaries(st.text(max_size=5), _scalars, max_size=3),
)


def _value_for(dest: str):
    """Random values, plus the flag's default and its default written as text."""
    default = _ACTIONS[dest].default
    plausible = [st.just(default)]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        plausible.append(st.just(str(default)))
    if _ACTIONS[dest].choices:
        plausible.append(st.sampled_from(list(_ACTIONS[dest].choices)))
    return st.one_of(_values, *plausible)


_entries = st.sampled_from(sorted(_ACTIONS)).flatmap(lambda d: st.tuples(st.just(d), _value_for(d)))


@st.composite
def _configs(draw):
    flat = dict(draw(st.lists(_entries, max_size=6)))
    if draw(st.booleans()):  # the md: block form for the --md-* keys
        block = {k[3:]: flat.pop(k) for k in list(flat) if k.startswith("md_")}
        if block or draw(st.booleans()):
            if draw(st.booleans()):
                block["enabled"] = draw(_scalars)
            flat["md"] = block
    return flat


def _check_typed(ns: argparse.Namespace) -> None:
    """Every attribute has its flag's type."""
    for dest, a in _ACTIONS.items():
        v = getattr(ns, dest)
        where = f"{dest}={v!r}"
        if a.nargs == 0:  # a switch (store_true/false, --x/--no-x)
            assert isinstance(v, bool), where
            continue
        if isinstance(a, KwargsAction):
            assert isinstance(v, dict) and all(isinstance(k, str) for k in v), where
            continue
        if v is None:
            assert a.default is None or args_mod.NULL_VALUES.get(dest, 0) is None, where
            continue
        items = v
        if a.nargs in ("+", "*") or isinstance(a.nargs, int):
            assert isinstance(v, list), where
            if isinstance(a.nargs, int):
                assert len(v) == a.nargs, where
        else:
            items = [v]
        for item in items:
            if a.type is None:
                assert isinstance(item, str), where
            elif a.type is int:
                assert isinstance(item, int) and not isinstance(item, bool), where
            elif a.type is args_mod._count_or_fraction:  # an image count or a fraction
                assert isinstance(item, (int, float)) and not isinstance(item, bool), where
                assert item >= 1 if isinstance(item, int) else 0 < item < 1, where
            else:  # float or float-or-None
                assert isinstance(item, float), where
            if a.choices is not None:
                assert item in a.choices, where


_quick = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_quick
@given(cfg=_configs(), cli_extra=st.sampled_from([[], ["--epochs", "2"], ["--md"]]))
def test_config_parser_accepts_well_typed_or_raises_config_error(cfg, cli_extra):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.yaml"
        f.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        try:
            ns = parse_args(["-c", str(f), *cli_extra])
        except ConfigError:
            return
    _check_typed(ns)


@_quick
@given(text=st.one_of(st.text(max_size=60), st.binary(max_size=60)))
def test_config_parser_on_arbitrary_file_content(text):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.yaml"
        if isinstance(text, bytes):
            f.write_bytes(text)
        else:
            f.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            ns = parse_args(["-c", str(f)])
        except ConfigError:
            return
    _check_typed(ns)


@_quick
@given(argv=st.lists(st.one_of(
    st.sampled_from([s for a in _ACTIONS.values() for s in a.option_strings]),
    st.text(max_size=8),
    st.sampled_from(["-1", "0", "1.5", "nan", "abc", "--", "-c"]),
), max_size=6))  # fmt: skip
def test_command_line_parser_accepts_well_typed_or_raises_config_error(argv):
    try:
        ns = parse_args(argv)
    except ConfigError:
        return
    _check_typed(ns)


# ------------------------------------------------------------------------------------------
# property-based: the layer-spec resolver
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_model():
    """resnet20_cifar and its traced forward (computed once: the trace is what each spec is
    resolved against, and it depends only on the model and the input size)."""
    import timm

    import md_plugin.models  # noqa: F401
    from md_plugin.layers.select import trace_model

    model = timm.create_model("resnet20_cifar", num_classes=10).eval()
    return model, trace_model(model, (3, 32, 32))


_MODULE_NAMES = [n for n, _ in __import__("timm").create_model("resnet20_cifar").named_modules()]
_spec_atoms = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "last_conv",
            "penultimate_fc",
            "conv:-1",
            "fc:-2",
            "fc:-1",
            "*",
            "layer?.*",
            "[",
            "layer3.[0-1].conv2",
            "layer3.*.bn*",
            "",
            " ",
        ]
    ),  # fmt: skip
    st.sampled_from(_MODULE_NAMES),
    st.tuples(
        st.sampled_from(["conv:", "fc:", "conv:+", "fc:--"]), st.integers(-(10**30), 10**30)
    ).map(lambda t: f"{t[0]}{t[1]}"),  # fmt: skip
    st.tuples(st.sampled_from(_MODULE_NAMES), st.integers(0, 30), st.sampled_from("*?[]!.,")).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    ),
)
_specs = st.one_of(_spec_atoms, st.lists(_spec_atoms, max_size=4).map(",".join))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(spec=_specs)
def test_layer_resolver_returns_valid_refs_or_raises_config_error(cifar_model, spec):
    from md_plugin.layers import resolve_layers, select

    model, trace = cifar_model
    try:
        with warnings.catch_warnings(), mock.patch.object(select, "trace_model", lambda *a: trace):
            warnings.simplefilter("ignore")
            refs = resolve_layers(model, spec, input_size=(3, 32, 32))
    except ConfigError:
        return
    modules = dict(model.named_modules())
    assert refs, spec
    assert len({r.name for r in refs}) == len(refs)
    for r in refs:
        assert r.name in modules and modules[r.name] is r.module
        assert len(r.out_shape) in (2, 4) and r.spatial == (len(r.out_shape) == 4)
        assert r.channels == r.out_shape[1] >= 1


@pytest.mark.parametrize("seed", range(40))
def test_any_garbage_checkpoint_is_a_clear_error(tmp_path, seed):
    """Random bytes make torch's unpickler raise many exception types; all become one MDError."""
    rng = random.Random(seed)
    path = tmp_path / "x.pth.tar"
    data = rng.randbytes(rng.randint(1, 4096))
    if seed % 2:  # start like a pickle so the unpickler gets further than the first byte
        data = b"\x80\x02" + data
    path.write_bytes(data)
    with pytest.raises(MDError, match="cannot read checkpoint .*: (not a checkpoint|corrupt)") as e:
        load_checkpoint_file(path)
    assert "weights_only" not in str(e.value)  # torch's advice to run the file's code
