"""train_md.py's command line: timm names, YAML defaults, strict keys, typed values."""

from __future__ import annotations

import pytest

from md_plugin.errors import ConfigError
from md_plugin.train.args import UNSUPPORTED, create_parser, parse_args


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


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    cfg = _yaml(tmp_path, "model: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        parse_args(["-c", cfg])
    cfg = _yaml(tmp_path, "lrr: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        parse_args(["-c", cfg])


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


def test_unsupported_timm_flag_errors_but_default_value_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match="--mixup is a timm train.py option"):
        parse_args(["--mixup", "0.8"])
    # a timm YAML that mentions the flag at its default still loads
    a = parse_args(["-c", _yaml(tmp_path, "mixup: 0.0\ncutmix: 0.0\n")])
    assert a.mixup == 0.0
    assert "sync_bn" in UNSUPPORTED


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
