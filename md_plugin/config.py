"""Two-stage configuration shared by every command: a YAML file sets defaults, flags win.

``train_md.py``, ``md-doctor split`` and ``md-doctor patch`` all read ``-c/--config FILE.yaml``
first and make its keys the parser's defaults, so the command line wins (timm's scheme). This
module is the neutral base of that parse: it imports nothing from :mod:`md_plugin.train` or
:mod:`md_plugin.splitter`, which both build their parsers on it.

What it adds to timm's loader: keys the parser does not know are reported together in one error
(or one warning), YAML values are converted with each flag's own type (PyYAML reads ``3e-4`` as a
string), ``null`` is accepted where the parser says what it means (``Parser(null_values=...)``),
an ``md:`` block's keys are the ``--md-*`` flags without the prefix, and a key given twice (in one
mapping, or both in the ``md:`` block and flat) is an error instead of a silent last-one-wins.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "HelpFormatter",
    "KwargsAction",
    "Parser",
    "apply_config",
    "args_to_yaml_dict",
    "load_config",
    "parser_actions",
    "read_yaml",
]


class KwargsAction(argparse.Action):
    """``--model-kwargs a=1 b=x``: a dict whose values are parsed as YAML scalars.

    The same flag shape as timm's ``ParseKwargs``, so a timm ``args.yaml`` (which records the
    dict) and the command line (which gives ``key=value`` pairs) fill the same destination.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        out: dict[str, Any] = {}
        for v in values:
            if "=" not in v:
                parser.error(f"{option_string} expects key=value pairs, got {v!r}")
            k, val = v.split("=", 1)
            out[k] = yaml.safe_load(val)
        setattr(namespace, self.dest, out)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default, except switches and required options.

    A switch (``store_true``) is off unless given, and a required option has no default, so
    "(default: False)" / "(default: None)" would only add noise there; a help text that already
    says what the default is keeps its own words.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or action.required:
            return text  # the text says the default itself (or there is none)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, "*"):
            return text
        shown = _show_default(action.default).replace("%", "%%")  # argparse %-formats help
        return f"{text} (default: {shown})"


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if value == "":
        return "''"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) if value else "none"
    return str(value)


class _HelpAllAction(argparse.Action):
    """``--help-all``: the help including the hidden groups, then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        # no destination (like -h): nothing lands in the namespace or reads as a config key
        super().__init__(
            option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs
        )

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(parser.format_help(show_all=True), sys.stdout)
        parser.exit()


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`ConfigError` line instead of usage + exit.

    Groups added with ``hidden=True`` (flags that exist only so other tools' configs load) stay
    out of ``--help``; the parser then has ``--help-all``, which lists them too.

    Args:
        null_values: what a YAML ``null`` means for a key whose default is not ``None`` (e.g.
            ``class_map: null`` -> ``''``); other keys refuse ``null`` unless their default is
            ``None``.
        **kwargs: passed to :class:`argparse.ArgumentParser` (the formatter defaults to
            :class:`HelpFormatter`, which shows every default).
    """

    def __init__(self, *args: Any, null_values: Mapping[str, Any] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.null_values: dict[str, Any] = dict(null_values or {})
        self._hidden_groups: list[argparse._ArgumentGroup] = []

    def add_argument_group(self, *args: Any, hidden: bool = False, **kwargs: Any):
        """An argument group; ``hidden=True`` keeps it out of ``--help`` (see ``--help-all``)."""
        group = super().add_argument_group(*args, **kwargs)
        if hidden:
            if not self._hidden_groups:
                self.add_argument(
                    "--help-all", action=_HelpAllAction, help="show the help with every flag"
                )
            self._hidden_groups.append(group)
        return group

    def format_help(self, show_all: bool = False) -> str:  # type: ignore[override]
        """The help text; without ``show_all`` the hidden groups are left out and named."""
        if show_all or not self._hidden_groups:
            return super().format_help()
        hidden = [a for g in self._hidden_groups for a in g._group_actions]
        saved_help = [a.help for a in hidden]
        saved_groups, saved_epilog = self._action_groups, self.epilog
        titles = "; ".join(str(g.title) for g in self._hidden_groups)
        note = f"--help-all also lists {len(hidden)} more flags: {titles}."
        try:
            for a in hidden:
                a.help = argparse.SUPPRESS
            self._action_groups = [g for g in saved_groups if g not in self._hidden_groups]
            self.epilog = f"{saved_epilog}\n\n{note}" if saved_epilog else note
            return super().format_help()
        finally:
            for a, text in zip(hidden, saved_help):
                a.help = text
            self._action_groups, self.epilog = saved_groups, saved_epilog

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see {self.prog} --help)")


def parser_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's actions by destination name (what a YAML key must be), without help/config.

    Args:
        parser: any argparse parser.

    Returns:
        dest -> action, for every option and positional a config file may set.
    """
    return {
        a.dest: a for a in parser._actions if a.dest not in ("help", "config", argparse.SUPPRESS)
    }


_BOOL_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse.BooleanOptionalAction,
)


def _convert(
    action: argparse.Action, key: str, value: Any, src: str, null_values: Mapping[str, Any]
) -> Any:
    """Type-check a YAML value against its flag and convert it (PyYAML reads 3e-4 as a string).

    Returns a value of the flag's own type (booleans for switches, lists for multi-value flags,
    values within ``choices``), or raises ConfigError.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{src}: key {key!r} {why}, got {value!r}")

    if value is None and key in null_values:
        return null_values[key]
    if isinstance(action, _BOOL_ACTIONS):
        if value is None and action.default is False:  # timm: `if args.flag` is false for None
            return False
        if not isinstance(value, bool):
            raise bad("expects true/false")
        return value
    if isinstance(action, KwargsAction):
        if value is None:  # timm writes {} but a hand-written `model_kwargs:` is null
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("expects a mapping of names to values")
        return value
    if value is None:
        if action.default is not None:
            raise bad("needs a value")
        return None
    if key == "md_layers" and isinstance(value, (list, tuple)):  # a YAML list of layer specs
        if not all(isinstance(v, str) for v in value):
            raise bad("expects layer names")
        value = ",".join(value)

    def one(v: Any) -> Any:
        if isinstance(v, (list, tuple, dict, set)):
            raise ValueError("a single value is expected")
        if action.type is None:  # a string option
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ValueError("a string is expected")
            out = str(v)
        else:
            if isinstance(v, bool):
                raise ValueError("a number is expected, not true/false")
            if action.type is int and isinstance(v, float) and not v.is_integer():
                raise ValueError("not an integer")
            out = action.type(v)
        if action.choices is not None and out not in action.choices:
            raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
        return out

    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            if isinstance(action.nargs, int) and len(items) != action.nargs:
                raise ValueError(f"{action.nargs} values are expected")
            if action.nargs == "+" and not items and action.default == []:
                return []  # timm writes an empty list for unset multi-value keys (wandb_tags)
            if action.nargs == "+" and not items:
                raise ValueError("at least one value is expected")
            return [one(v) for v in items]
        return one(value)
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{src}: key {key!r} has a bad value {value!r} ({e})") from None


def _yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line with the position and the cause (its text spans lines)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = ""
    if "\\t" in str(problem) or "\t" in str(problem) or "tab" in str(problem):
        hint = " (YAML does not allow tabs for indentation: use spaces)"
    return f"{where}{' '.join(str(problem).split())}{hint}"


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain PyYAML keeps the last value silently (``lr`` twice: the second wins). Keys brought in
    by a merge (``<<: *base``) may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML config file; every failure is one ConfigError line naming the file.

    A key given twice in one mapping is refused (plain YAML loaders keep the last silently).

    Args:
        path: the file.

    Returns:
        The parsed document (``{}`` for an empty file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}: key {e.key!r} is given twice (lines {e.first} and {e.second}); give it once"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}: {_yaml_error(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _flatten(raw: dict[Any, Any], path: Path) -> dict[str, Any]:
    """Dest names for every key: dashes become underscores, an ``md:`` block becomes md_*."""
    flat: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # dest -> the key as written, to name both of a clash

    def put(dest: str, written: str, value: Any) -> None:
        if dest in flat:  # `md: {alpha: ..}` and `md_alpha: ..`, or `md-alpha` and `md_alpha`
            raise ConfigError(
                f"{path}: {given_as[dest]!r} and {written!r} both set {dest}; give it once"
            )
        flat[dest], given_as[dest] = value, written

    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key == "config":  # recorded in a run's args.yaml; re-using that file must work
            continue
        if key == "md" and isinstance(v, dict):
            v = dict(v)
            enabled = v.pop("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"{path}: key 'md.enabled' expects true/false, got {enabled!r}")
            put("md", "md", enabled)
            for mk, mv in v.items():
                put("md_" + str(mk).replace("-", "_"), f"md.{mk}", mv)
        else:
            put(key, str(k), v)
    return flat


def _unknown_keys(
    flat: Mapping[str, Any], actions: Mapping[str, argparse.Action], path: Path, ignore: bool
) -> None:
    """All keys no flag has, in one error (or, with ``ignore``, one warning), near names named."""
    unknown = [k for k in flat if k not in actions]
    if not unknown:
        return
    names = []
    for key in unknown:
        near = difflib.get_close_matches(key, list(actions), n=1)
        names.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    listed = ", ".join(names)
    count = f"{len(unknown)} unknown config key{'s' if len(unknown) > 1 else ''}"
    if not ignore:
        raise ConfigError(
            f"{path}: {count}: {listed} (no timm train.py knows them; "
            "--ignore-unknown-keys skips them with a warning)"
        )
    warnings.warn(f"{path}: ignoring {count}: {listed}", UserWarning, stacklevel=4)


def load_config(
    path: str | Path, parser: argparse.ArgumentParser, ignore_unknown: bool = False
) -> dict[str, Any]:
    """Read a YAML config into validated, typed parser defaults.

    Keys the parser does not know are reported together: one ConfigError, or with
    ``ignore_unknown`` (or ``ignore_unknown_keys: true`` in the file) one warning, and skipped.

    Args:
        path: the YAML file; keys are the flags' destination names (dashes allowed).
        parser: the command's parser; its actions type-check the values, and its
            ``null_values`` (a :class:`Parser`) say what ``null`` means per key.
        ignore_unknown: warn about unknown keys instead of refusing them.

    Returns:
        dest -> value, ready for ``parser.set_defaults(**...)``.
    """
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of flag names to values")
    flat = _flatten(raw, path)
    actions = parser_actions(parser)
    _unknown_keys(flat, actions, path, ignore_unknown or flat.get("ignore_unknown_keys") is True)
    nulls = getattr(parser, "null_values", {})
    return {
        k: _convert(actions[k], k, v, str(path), nulls) for k, v in flat.items() if k in actions
    }


def apply_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    pre_cls: type[argparse.ArgumentParser] | None = None,
    ignore_unknown_flag: bool = False,
) -> tuple[argparse.Namespace, list[str]]:
    """First stage of the two-stage parse: the YAML of ``-c/--config`` becomes the defaults.

    Args:
        parser: the command's full parser; its defaults are set from the file.
        argv: the command line (``None``: ``sys.argv[1:]``).
        pre_cls: the first stage's parser class (default :class:`Parser`, named after
            ``parser``, so its one-line errors point at the command's ``--help``).
        ignore_unknown_flag: the first stage also reads ``--ignore-unknown-keys``.

    Returns:
        The first stage's namespace (``config`` and maybe ``ignore_unknown_keys``) and the
        arguments it did not consume.
    """
    if pre_cls is None:
        pre = Parser(prog=parser.prog, add_help=False)
    else:
        pre = pre_cls(add_help=False)
    pre.add_argument("-c", "--config", default="")
    if ignore_unknown_flag:
        pre.add_argument("--ignore-unknown-keys", action="store_true", default=False)
    known, rest = pre.parse_known_args(argv)
    if known.config:
        ignore = ignore_unknown_flag and known.ignore_unknown_keys
        parser.set_defaults(**load_config(known.config, parser, ignore))
    return known, rest


def args_to_yaml_dict(args: argparse.Namespace) -> dict[str, Any]:
    """What a run's ``args.yaml`` records: every destination, YAML-safe (tuples as lists).

    Args:
        args: the parsed namespace.

    Returns:
        A dict ``yaml.safe_dump`` can write and :func:`load_config` can read back.
    """
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
