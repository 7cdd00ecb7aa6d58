"""md_plugin.config: the neutral two-stage parser every command builds on."""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import PKG, import_targets

from md_plugin.config import KwargsAction, Parser, apply_config, args_to_yaml_dict, load_config
from md_plugin.errors import ConfigError


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the md_plugin modules a file imports (relative imports resolved)."""
    return {m for m, _ in import_targets(path) if m.startswith("md_plugin")}


def test_config_is_a_neutral_base():
    """config.py imports only the error classes; the splitter never reaches into the trainer."""
    assert _imported_modules(PKG / "config.py") == {"md_plugin.errors"}
    for path in sorted((PKG / "splitter").glob("*.py")):
        bad = {m for m in _imported_modules(path) if m.startswith("md_plugin.train")}
        assert not bad, f"{path.name} imports {bad}"


def _parser(**kw) -> Parser:
    p = Parser(prog="tool", **kw)
    p.add_argument("-c", "--config", default="")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate")
    p.add_argument("--name", default="x", help="a name")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=KwargsAction, help="kw")
    return p


def test_two_stage_parse_yaml_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 3e-4\nname: yaml\nflag: true\nmodel_kwargs: {a: 1}\n")
    p = _parser()
    known, rest = apply_config(p, ["-c", str(cfg), "--name", "cli"])
    assert known.config == str(cfg) and rest == ["--name", "cli"]
    a = p.parse_args(rest)
    assert (a.lr, a.name, a.flag, a.model_kwargs) == (3e-4, "cli", True, {"a": 1})
    assert args_to_yaml_dict(a)["model_kwargs"] == {"a": 1}


def test_parser_errors_are_one_line_naming_the_command():
    with pytest.raises(ConfigError, match=r"^argument --lr: .* \(see tool --help\)$"):
        _parser().parse_args(["--lr", "x"])
    with pytest.raises(ConfigError, match="expects key=value pairs"):
        _parser().parse_args(["--model-kwargs", "a"])


def test_null_values_are_the_parsers_own(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: null\n")
    with pytest.raises(ConfigError, match="'name' needs a value"):
        load_config(cfg, _parser())
    assert load_config(cfg, _parser(null_values={"name": ""})) == {"name": ""}


def test_help_shows_defaults():
    text = _parser().format_help()
    assert "learning rate (default: 0.1)" in text and "a name (default: x)" in text
    assert "a switch\n" in text  # a switch is off unless given: no "(default: False)"


def test_a_key_given_twice_is_one_line_naming_key_and_file(tmp_path):
    """Plain YAML keeps the last `lr` silently; a config must not."""
    from md_plugin.train.args import parse_args

    cfg = tmp_path / "dup.yaml"
    cfg.write_text("lr: 0.1\nepochs: 3\nlr: 0.5\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["-c", str(cfg)])
    msg = str(e.value)
    assert "\n" not in msg and str(cfg) in msg and "'lr' is given twice (lines 1 and 3)" in msg
    nested = tmp_path / "nested.yaml"
    nested.write_text("md:\n  alpha: 0.1\n  alpha: 0.2\n")
    with pytest.raises(ConfigError, match="'alpha' is given twice"):
        parse_args(["-c", str(nested)])
    merged = tmp_path / "merge.yaml"  # a merge key's values may be overridden, as YAML intends
    merged.write_text("base: &b {a: 1}\nmodel_kwargs:\n  <<: *b\n  a: 2\n")
    p = _parser()
    p.add_argument("--base", nargs="*", default={}, action=KwargsAction)
    assert load_config(merged, p)["model_kwargs"] == {"a": 2}


def test_a_key_in_the_md_block_and_flat_is_one_line(tmp_path):
    from md_plugin.train.args import parse_args

    cfg = tmp_path / "both.yaml"
    cfg.write_text("md:\n  alpha: 0.1\nmd_alpha: 0.7\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["-c", str(cfg)])
    msg = str(e.value)
    assert "\n" not in msg and str(cfg) in msg
    assert "'md.alpha' and 'md_alpha' both set md_alpha" in msg
    dashed = tmp_path / "dashed.yaml"  # two spellings of one flag are the same clash
    dashed.write_text("md-alpha: 0.1\nmd_alpha: 0.7\n")
    with pytest.raises(ConfigError, match="'md-alpha' and 'md_alpha' both set md_alpha"):
        parse_args(["-c", str(dashed)])
