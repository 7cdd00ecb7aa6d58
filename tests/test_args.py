"""train_md.py's command line: timm names, YAML defaults, strict keys, typed values."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from md_plugin.errors import ConfigError
from md_plugin.train.args import NO_OPS, NULL_VALUES, REFUSED, create_parser, parse_args
from md_plugin.train.timm_compat import INERT_FLAGS

DATA = Path(__file__).resolve().parent / "data"


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_sets_defaults_and_cli_wins(tmp_path):
    cfg = _yaml(tmp_path, "model: resnet32_cifar\nepochs: 7\nbatch_size: 32\nlr: 0.2\n")
    a = parse_args(["-c", cfg, "--epochs", "3", "-b", "16"])
    assert a.model == "resnet32_cifar"  # from YAML
    assert a.epochs == 3 and a.batch_size == 16  # CLI beats YAML
    assert a.lr == 0.2
    b = parse_args(["--config", cfg])
    assert b.epochs == 7 and b.batch_size == 32


def test_yaml_numbers_in_exponent_notation_are_numbers(tmp_path):
    # PyYAML reads 3e-4 as the string '3e-4'; the flag's type must convert it, lists too
    cfg = _yaml(tmp_path, "lr: 3e-4\nweight_decay: 5e-4\nmean: [0.5, 4e-1, 3e-1]\nmd_alpha: 1e-2\n")
    a = parse_args(["-c", cfg])
    assert a.lr == pytest.approx(3e-4) and isinstance(a.lr, float)
    assert a.weight_decay == pytest.approx(5e-4)
    assert a.mean == [0.5, 0.4, 0.3]
    assert a.md_alpha == pytest.approx(0.01)


def test_unknown_yaml_keys_are_all_reported_in_one_error(tmp_path):
    cfg = _yaml(tmp_path, "model: resnet18\nlearning_rate: 0.1\nlrr: 0.1\nfoo_bar: 1\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["-c", cfg])
    msg = str(e.value)
    assert "3 unknown config keys" in msg and "\n" not in msg
    for part in (
        "'learning_rate'",
        "'lrr' (did you mean 'lr'?)",
        "'foo_bar'",
        "--ignore-unknown-keys",
    ):
        assert part in msg, part


def test_ignore_unknown_keys_is_one_warning_listing_them(tmp_path):
    cfg = _yaml(tmp_path, "model: resnet18\nmy_fork_key: 3\nother: x\nepochs: 4\n")
    with pytest.warns(UserWarning) as rec:
        a = parse_args(["-c", cfg, "--ignore-unknown-keys"])
    msgs = [str(w.message) for w in rec if "unknown" in str(w.message)]
    assert len(msgs) == 1 and "'my_fork_key'" in msgs[0] and "'other'" in msgs[0]
    assert a.epochs == 4 and not hasattr(a, "my_fork_key")
    # the switch may also live in the file itself
    cfg2 = _yaml(tmp_path, "ignore_unknown_keys: true\nmy_fork_key: 3\n")
    with pytest.warns(UserWarning, match="my_fork_key"):
        parse_args(["-c", cfg2])


def test_bad_yaml_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'epochs' has a bad value"):
        parse_args(["-c", _yaml(tmp_path, "epochs: ten\n")])
    with pytest.raises(ConfigError, match="expects true/false"):
        parse_args(["-c", _yaml(tmp_path, "amp: 3\n")])


def test_md_block_maps_to_md_flags(tmp_path):
    cfg = _yaml(
        tmp_path, "md:\n  alpha: 0.5\n  layers: layer3.*.conv2\n  per_class: 10\n  every: 4\n"
    )
    a = parse_args(["-c", cfg])
    assert (
        a.md is True
        and a.md_alpha == 0.5
        and a.md_layers == "layer3.*.conv2"
        and a.md_per_class == 10
        and a.md_every == 4
    )
    assert parse_args([]).md_every == 1  # default: every step
    off = parse_args(["-c", _yaml(tmp_path, "md:\n  enabled: false\n  alpha: 0.5\n")])
    assert off.md is False and off.md_alpha == 0.5


def test_timm_flag_names_and_defaults():
    a = parse_args([])
    # timm train.py defaults
    assert (a.model, a.batch_size, a.opt, a.sched, a.epochs, a.weight_decay) == (
        "resnet50", 128, "sgd", "cosine", 300, 2e-5,
    )  # fmt: skip
    assert (a.smoothing, a.seed, a.checkpoint_hist, a.val_split) == (0.1, 42, 10, "validation")
    flags = {s for act in create_parser()._actions for s in act.option_strings}
    for f in ["--model", "--pretrained", "--num-classes", "--img-size", "--initial-checkpoint",
              "--resume", "--data-dir", "--dataset", "--train-split", "--val-split", "-b",
              "--batch-size", "--workers", "--opt", "--lr", "--momentum", "--weight-decay",
              "--clip-grad", "--sched", "--epochs", "--warmup-epochs", "--decay-epochs",
              "--decay-rate", "--min-lr", "--amp", "--amp-dtype", "--model-ema", "--output",
              "--experiment", "--seed", "--log-interval", "--checkpoint-hist", "--hflip",
              "--color-jitter", "--smoothing", "--reprob"]:  # fmt: skip
        assert f in flags, f


def test_refused_timm_flags_error_together_but_defaults_are_accepted(tmp_path):
    with pytest.raises(
        ConfigError, match="--sync-bn is|not supported by train_md.py: --sync-bn"
    ) as e:
        parse_args(["--sync-bn", "--tta", "2"])
    assert "--sync-bn" in str(e.value) and "--tta" in str(e.value)  # both in one line
    # a timm YAML that mentions them at their defaults still loads
    a = parse_args(["-c", _yaml(tmp_path, "sync_bn: false\ntta: 0\nkd_model_name: null\n")])
    assert a.sync_bn is False and a.tta == 0
    assert "sync_bn" in REFUSED


@pytest.mark.parametrize("name", ["head", "v0.6.13"])
def test_full_timm_args_yaml_loads(name):
    """args.yaml as timm's own parser writes it (every key, generated from train.py)."""
    path = DATA / f"timm_args_{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert len(raw) > 110  # every key of that version's parser
    a = parse_args(["-c", str(path)])
    for key, value in raw.items():
        got = getattr(a, key)
        if key == "data_dir":
            continue
        assert got == value or (isinstance(value, (list, tuple)) and list(value) == got), key
    assert a.data_dir == "/data/imagenet"


def test_timm_1_0_31_keys_are_known(tmp_path):
    cfg = "stop_epoch: null\nsave_epochs: null\npretrained_cfg_overlay: {}\nlr_decay_fn: null\n"
    cfg += "lr_stable_timescale: null\n"
    a = parse_args(["-c", _yaml(tmp_path, cfg)])
    assert a.stop_epoch is None and a.pretrained_cfg_overlay == {}
    with pytest.raises(ConfigError, match="--stop-epoch"):
        parse_args(["-c", _yaml(tmp_path, "stop_epoch: 3\n")])


def test_timm_0_4_keys_are_known(tmp_path):
    a = parse_args(
        ["-c", _yaml(tmp_path, "bn_tf: false\njsd: false\nvalidation_batch_size_multiplier: 1\n")]
    )
    assert a.bn_tf is False and a.jsd is False and a.validation_batch_size is None


def _help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_every_flag_has_a_help_line_with_its_default():
    for act in create_parser()._actions:
        assert act.help and act.help.strip() and act.help != "==SUPPRESS==", act.dest
    a = parse_args([])
    formatter = create_parser().formatter_class(prog="train_md.py")
    for act in create_parser()._actions:  # the shown default is the parsed one
        if act.option_strings and act.nargs != 0 and "default" not in act.help.lower():
            text = formatter._get_help_string(act)
            assert text.endswith(")") and "(default: " in text, act.dest
            assert getattr(a, act.dest) == act.default, act.dest


def test_help_hides_the_timm_compat_flags_and_help_all_lists_them(capsys):
    text = _help_of(["--help"], capsys)
    full = _help_of(["--help-all"], capsys)
    assert "(default: 0.1)" in text and "--md-alpha" in text  # defaults are shown
    hidden = {*REFUSED, *INERT_FLAGS, *NO_OPS, "worker_seeding"}
    for dest in hidden:
        flag = "--" + dest.replace("_", "-")
        assert flag not in text, flag  # grouped away from the flags that train something
        assert flag in full, flag
    assert "--help-all also lists 62 more flags" in text
    assert len(text.splitlines()) < len(full.splitlines()) - 60
    for act in create_parser()._actions:  # every other flag is in the plain help
        for opt in act.option_strings:
            assert opt in full, opt
            assert opt in text or act.dest in hidden, opt


def test_warmup_longer_than_the_run_warns_once():
    with pytest.warns(UserWarning, match="--warmup-epochs 5 >= --epochs 2") as rec:
        parse_args(["--epochs", "2"])
    assert len([w for w in rec if "warm-up" in str(w.message)]) == 1
    assert "\n" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_args(["--epochs", "6"])  # 5 of 6 epochs warm up: the run still reaches its lr
        parse_args(["--epochs", "2", "--warmup-epochs", "0"])
        parse_args(["--epochs", "2", "--warmup-prefix"])  # the warm-up comes before the run
        parse_args(["--epochs", "2", "--sched", "none"])  # no schedule, no warm-up


def test_trust_remote_code_without_a_hugging_face_dataset_is_one_warning(tmp_path):
    """timm ignores dataset_trust_remote_code unless the dataset is hfds/...: so do we."""
    cfg = _yaml(tmp_path, "dataset: torch/cifar10\ndataset_trust_remote_code: true\n")
    with pytest.warns(UserWarning, match=r"--dataset-trust-remote-code \(needs a Hugging Face"):
        a = parse_args(["-c", cfg])
    assert a.dataset_trust_remote_code is True
    with pytest.raises(ConfigError, match="--dataset-trust-remote-code"):
        parse_args(["--dataset", "hfds/beans", "--dataset-trust-remote-code"])


def test_null_where_timm_accepts_none(tmp_path):
    cfg = "color_jitter: null\nscale: null\nsmoothing: null\namp: null\ntrain_interpolation: null\n"
    cfg += "resume: null\naa: null\nmodel_kwargs: null\n"
    a = parse_args(["-c", _yaml(tmp_path, cfg)])
    assert a.color_jitter is None  # no colour jitter, as timm
    assert a.scale == [0.08, 1.0] and a.smoothing == 0.0 and a.amp is False
    assert a.train_interpolation == "" and a.resume == "" and a.aa is None
    assert a.model_kwargs == {}
    assert set(NULL_VALUES) <= {act.dest for act in create_parser()._actions}
    with pytest.raises(ConfigError, match="'epochs' needs a value"):
        parse_args(["-c", _yaml(tmp_path, "epochs: null\n")])


def test_inert_flags_warn_once_when_their_flag_is_off(tmp_path):
    with pytest.warns(UserWarning) as rec:
        parse_args(["--bce-sum", "--mixup-prob", "0.5", "--wandb-project", "x"])
    msgs = [str(w.message) for w in rec if "no effect" in str(w.message)]
    assert len(msgs) == 1
    for part in (
        "--bce-sum (needs --bce-loss)",
        "--mixup-prob",
        "--wandb-project (needs --log-wandb)",
    ):
        assert part in msgs[0]
    with pytest.warns(UserWarning, match=r"--bce-target-thresh \(needs --bce-loss\)"):
        parse_args(["-c", _yaml(tmp_path, "bce_target_thresh: 0.2\n")])  # set in a file too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_args([])  # nothing to warn about at the defaults
        parse_args(["-c", str(DATA / "timm_args_head.yaml")])


def test_older_timm_keys_map_onto_flags(tmp_path):
    a = parse_args(
        [
            "-c",
            _yaml(tmp_path, "native_amp: true\nvalidation_batch_size_multiplier: 2\n"),
            "-b",
            "16",
        ]
    )
    assert a.amp is True and a.validation_batch_size == 32
    assert parse_args(["--drop-connect", "0.2"]).drop_path == 0.2
    with pytest.raises(ConfigError, match="--drop-connect 0.2 and --drop-path 0.1 disagree"):
        parse_args(["--drop-connect", "0.2", "--drop-path", "0.1"])
    with pytest.raises(ConfigError, match="--apex-amp"):
        parse_args(["-c", _yaml(tmp_path, "apex_amp: true\n")])


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--device", "mps"], "--device 'mps': use cpu, cuda or cuda:N"),
        (["--train-interpolation", "lanczos"], "--train-interpolation 'lanczos'"),
        (["--reprob", "1.5"], r"--reprob must be in \[0, 1\]"),
        (["--recovery-interval", "10"], "--recovery-interval"),
        (["--layer-decay", "0"], "--layer-decay must be > 0"),
    ],
)
def test_bad_recipe_values(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(argv)


def test_layer_decay_reaches_timm_optimizer():
    """--layer-decay goes through timm's optimizer_kwargs: earlier blocks get smaller lr scales."""
    import timm
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    a = parse_args(["--opt", "adamw", "--lr", "0.1", "--layer-decay", "0.5"])
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3
    )
    opt = create_optimizer_v2(model, **optimizer_kwargs(cfg=a))
    scales = sorted({round(g["lr_scale"], 6) for g in opt.param_groups})
    # depth 2: embed (layer 0), block 0, block 1, head -> 0.5^3, 0.5^2, 0.5, 1
    assert scales == [0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--md-alpha", "-1"], "--md-alpha must be >= 0"),
        (["--md-theta", "1.5"], r"--md-theta must be in \[0, 1\]"),
        (["--md-per-class", "0"], "--md-per-class must be >= 1"),
        (["--md-every", "0"], "--md-every must be >= 1, got 0"),
        (["--md-layers", " , "], "--md-layers is empty"),
        (["--imb-ratio", "1"], "--imb-ratio must be > 1"),
        (["--md", "--md-beta", "1"], "needs --md-masks"),
    ],
)
def test_out_of_range_values(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(argv)


def test_model_kwargs_parsed_as_yaml_scalars():
    a = parse_args(["--model-kwargs", "zero_init_last=false", "depth=3"])
    assert a.model_kwargs == {"zero_init_last": False, "depth": 3}


def test_positional_data_is_data_dir():
    assert parse_args(["/some/dir"]).data_dir == "/some/dir"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--mixup", "0.2", "--loss", "focal"], "--loss focal needs integer labels"),
        (["--bce-loss", "--loss", "ldam"], "--loss ldam needs integer labels: it cannot be combined with --bce-loss"),
        (["--cutmix", "1", "--drw-epoch", "3"], "--drw-epoch re-weights --loss ce"),
        (["--aug-repeats", "3", "--sampler", "sqrt"], "--aug-repeats and --sampler sqrt"),
        (["--md", "--md-masks", "m/", "--aa", "rand-m9-mstd0.5"], "--md-masks .* --aa rand-m9-mstd0.5"),
        (["--md", "--md-masks", "m/", "--mixup", "0.2"], "--md-masks .*--mixup/--cutmix"),
        (["--md", "--md-masks", "m/", "--train-crop-mode", "rkrr"], "--md-masks .*rkrr"),
    ],
)  # fmt: skip
def test_recipe_combinations_refused_in_one_line(argv, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_args(argv)
    assert "\n" not in str(e.value)


def test_masks_with_photometric_recipe_are_fine():
    a = parse_args(["--md", "--md-masks", "m/", "--reprob", "0.3", "--grayscale-prob", "0.2"])
    assert a.md_masks == "m/" and a.reprob == 0.3


def test_a_warning_of_ours_prints_as_one_line(tmp_path):
    """The CLI prints md_plugin's own warnings as one ``warning:`` line (Python prints two),
    and leaves other packages' warnings in Python's format."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "train_md.py"), "--dataset", "torch/cifar10", "--data-dir",
           str(tmp_path / "missing"), "--epochs", "1", "--warmup-epochs", "3", "--output",
           str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2
    assert lines[0].startswith("warning: --warmup-epochs 3 >= --epochs 1") and len(lines) == 2
    assert lines[1].startswith("error: ")

    from md_plugin.errors import format_warning

    other = format_warning(UserWarning("x"), UserWarning, "/elsewhere/pkg/mod.py", 7, "")
    assert other.startswith("/elsewhere/pkg/mod.py:7: UserWarning: x")
