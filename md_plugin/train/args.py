"""Command line of ``train_md.py``: timm train.py's flag names plus Model Doctor flags.

Parsing is two-stage like timm: ``-c/--config FILE.yaml`` sets defaults, the command line wins.
Unlike timm we refuse unknown YAML keys (naming the key and the closest valid one), convert
YAML strings such as ``3e-4`` with each flag's own type, and accept an ``md:`` block whose keys
are the ``--md-*`` flags without the prefix. timm flags we do not implement are still parsed, so
an existing timm YAML loads, but any non-default value for them is an error rather than a
silently ignored request.
"""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["create_parser", "parse_args", "UNSUPPORTED", "args_to_yaml_dict"]


class _KwargsAction(argparse.Action):
    """``--model-kwargs a=1 b=x``: values parsed as YAML scalars (timm's ParseKwargs)."""

    def __call__(self, parser, namespace, values, option_string=None):
        out: dict[str, Any] = {}
        for v in values:
            if "=" not in v:
                parser.error(f"{option_string} expects key=value pairs, got {v!r}")
            k, val = v.split("=", 1)
            out[k] = yaml.safe_load(val)
        setattr(namespace, self.dest, out)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line from the CLI) instead of printing the usage."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see train_md.py --help)")


def _count_or_fraction(v: str) -> int | float | None:
    from ..data.split import parse_count_or_fraction

    if str(v).lower() in ("none", "null", ""):
        return None
    try:
        return parse_count_or_fraction(v)
    except ConfigError as e:  # argparse then names the flag
        raise argparse.ArgumentTypeError(str(e)) from None


def _float_or_none(v: str) -> float | None:
    return None if str(v).lower() in ("none", "null", "") else float(v)


# timm train.py flags we accept only at their default value: dest -> (flag, default, kwargs)
UNSUPPORTED: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "aa": ("--aa", None, {}),
    "aug_repeats": ("--aug-repeats", 0.0, {"type": float}),
    "aug_splits": ("--aug-splits", 0, {"type": int}),
    "jsd_loss": ("--jsd-loss", False, {"action": "store_true"}),
    "bce_loss": ("--bce-loss", False, {"action": "store_true"}),
    "mixup": ("--mixup", 0.0, {"type": float}),
    "cutmix": ("--cutmix", 0.0, {"type": float}),
    "cutmix_minmax": ("--cutmix-minmax", None, {"type": float, "nargs": "+"}),
    "mixup_off_epoch": ("--mixup-off-epoch", 0, {"type": int}),
    "drop_block": ("--drop-block", None, {"type": float}),
    "train_crop_mode": ("--train-crop-mode", None, {}),
    "split_bn": ("--split-bn", False, {"action": "store_true"}),
    "sync_bn": ("--sync-bn", False, {"action": "store_true"}),
    "torchscript": ("--torchscript", False, {"action": "store_true"}),
    "torchcompile": ("--torchcompile", None, {"nargs": "?", "const": "inductor"}),
    "model_ema_force_cpu": ("--model-ema-force-cpu", False, {"action": "store_true"}),
    "log_wandb": ("--log-wandb", False, {"action": "store_true"}),
    "use_multi_epochs_loader": ("--use-multi-epochs-loader", False, {"action": "store_true"}),
    "tta": ("--tta", 0, {"type": int}),
    "save_images": ("--save-images", False, {"action": "store_true"}),
    "layer_decay": ("--layer-decay", None, {"type": float}),
    "epoch_repeats": ("--epoch-repeats", 0.0, {"type": float}),
    "model_dtype": ("--model-dtype", None, {}),
    "kd_model_name": ("--kd-model-name", None, {}),
    "naflex_loader": ("--naflex-loader", False, {"action": "store_true"}),
    "torchcompile_mode": ("--torchcompile-mode", None, {}),
    "fuser": ("--fuser", "", {}),
    "fast_norm": ("--fast-norm", False, {"action": "store_true"}),
}

# timm flags that only tune timm-internal machinery we replace; accepted and documented as no-ops
_NO_OPS = {"no_prefetcher", "pin_mem", "worker_seeding", "local_rank", "device_modules"}


def create_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train_md.py",
        description="timm-compatible training with Model Doctor diagnosis and treatment",
    )
    p.add_argument(
        "-c", "--config", default="", metavar="FILE", help="YAML config (keys = flag dest names)"
    )

    g = p.add_argument_group("Dataset")
    g.add_argument(
        "data", nargs="?", metavar="DIR", default=None, help="(deprecated) same as --data-dir"
    )
    g.add_argument("--data-dir", default=None, help="dataset root")
    g.add_argument(
        "--dataset",
        default="",
        help="'' (folder), torch/cifar10, torch/cifar100, cifar10_lt, cifar100_lt, sklearn/digits, or any timm dataset name",
    )
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument(
        "--dataset-download",
        action="store_true",
        default=False,
        help="allow downloading (needs internet)",
    )
    g.add_argument(
        "--imb-ratio",
        type=float,
        default=100.0,
        help="long-tailed CIFAR imbalance ratio n_max/n_min (> 1)",
    )
    g.add_argument("--imb-type", default="exp", choices=["exp", "step"])
    g.add_argument(
        "--class-map",
        default="",
        metavar="FILE",
        help="timm class map: .txt (one class name or source index per line; line = new index) "
        "or a .pkl/.yaml/.json dict; unlisted classes are dropped (both splits)",
    )
    g.add_argument(
        "--class-cap",
        nargs="+",
        default=None,
        metavar="N|CLASS=N",
        help="at most N training images per class (after --class-map), drawn with --data-seed; "
        "CLASS=N caps one class (e.g. 5=500)",
    )
    g.add_argument(
        "--val-from-train",
        type=_count_or_fraction,
        default=None,
        metavar="N",
        help="hold out N training images (or a fraction < 1), stratified, seeded by --data-seed: "
        "they select the best epoch; --val-split becomes the test set, evaluated once at the end",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of --class-cap and --val-from-train (independent of --seed)",
    )
    g.add_argument(
        "--imb-seed", type=int, default=0, help="seed of the long-tailed subset (LDAM-DRW uses 0)"
    )

    g = p.add_argument_group("Model")
    g.add_argument(
        "--model", default="resnet50", help="timm model name, e.g. resnet32_cifar, resnet18"
    )
    g.add_argument("--pretrained", action="store_true", default=False)
    g.add_argument("--pretrained-path", default=None)
    g.add_argument("--initial-checkpoint", default="", help="load these weights before training")
    g.add_argument(
        "--resume", default="", help="resume the full training state from this checkpoint"
    )
    g.add_argument("--no-resume-opt", action="store_true", default=False)
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--gp", default=None, help="global pool type")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--in-chans", type=int, default=None)
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N")
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="")
    g.add_argument("-b", "--batch-size", type=int, default=128)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--grad-checkpointing", action="store_true", default=False)
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KwargsAction)
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)

    g = p.add_argument_group("Device and precision (accelerate)")
    g.add_argument(
        "--amp", action="store_true", default=False, help="mixed precision (see --amp-dtype)"
    )
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--device", default=None, help="'cpu' forces CPU; otherwise accelerate picks")
    g.add_argument("--no-ddp-bb", action="store_true", default=False)
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""])

    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=_float_or_none, default=None)
    g.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=_KwargsAction)

    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true", default=False)
    g.add_argument(
        "--lr",
        type=_float_or_none,
        default=None,
        help="absolute lr; default: --lr-base scaled by batch size",
    )
    g.add_argument("--lr-base", type=float, default=0.1)
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument("--lr-base-scale", default="", choices=["", "linear", "sqrt"])
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--lr-cycle-mul", type=float, default=1.0)
    g.add_argument("--lr-cycle-decay", type=float, default=0.5)
    g.add_argument("--lr-cycle-limit", type=int, default=1)
    g.add_argument("--lr-k-decay", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--start-epoch", type=int, default=None)
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-epochs", type=float, default=90.0)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-prefix", action="store_true", default=False)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--patience-epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = p.add_argument_group("Augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument(
        "--crop-padding",
        type=int,
        default=None,
        help="pad-and-random-crop (CIFAR: 4) instead of RandomResizedCrop",
    )

    g = p.add_argument_group("Classification loss and sampling (long-tailed data)")
    g.add_argument(
        "--loss",
        default="ce",
        help="ce, focal, reduced_focal, cb_ce, cb_focal, ldam, balanced_softmax, logit_adjust",
    )
    g.add_argument("--focal-gamma", type=float, default=2.0)
    g.add_argument("--rfl-threshold", type=float, default=0.5)
    g.add_argument("--cb-beta", type=float, default=0.9999)
    g.add_argument("--ldam-max-m", type=float, default=0.5)
    g.add_argument("--ldam-s", type=float, default=30.0)
    g.add_argument("--la-tau", type=float, default=1.0)
    g.add_argument(
        "--drw-epoch", type=int, default=None, help="deferred re-weighting from this epoch"
    )
    g.add_argument("--sampler", default="", help="'', class_balanced, sqrt, progressive")
    g.add_argument(
        "--sampler-k", type=int, default=4, help="class-balanced: samples per class visit"
    )
    g.add_argument(
        "--sampler-epoch-length",
        type=int,
        default=None,
        help="images per epoch (also without --sampler: a fresh random subset each epoch)",
    )

    g = p.add_argument_group("Model EMA")
    g.add_argument("--model-ema", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)

    g = p.add_argument_group("Model Doctor")
    g.add_argument(
        "--md",
        action="store_true",
        default=False,
        help="diagnose, then fine-tune with the Model Doctor losses",
    )
    g.add_argument(
        "--md-layers",
        default="last_conv",
        help="comma-separated layer specs: last_conv, penultimate_fc, conv:-2, names, globs",
    )
    g.add_argument(
        "--md-alpha",
        type=float,
        default=0.1,
        help="channel loss weight (per-sample normalised; official alpha / batch size)",
    )
    g.add_argument(
        "--md-beta", type=float, default=0.0, help="spatial loss weight (needs --md-masks)"
    )
    g.add_argument(
        "--md-every",
        type=int,
        default=1,
        help="lazy regularisation: compute the Model Doctor terms only on every k-th optimizer "
        "step, weighted by k (1 = every step)",
    )
    g.add_argument("--md-grad-mode", default="relu", choices=["relu", "abs"])
    g.add_argument("--md-mask-rule", default="theta", choices=["theta", "mean", "topk"])
    g.add_argument("--md-theta", type=float, default=0.2)
    g.add_argument("--md-topk", type=int, default=None)
    g.add_argument(
        "--md-per-class",
        type=int,
        default=50,
        help="high-confidence images per class for diagnosis",
    )
    g.add_argument("--md-min-confidence", type=float, default=0.0)
    g.add_argument("--md-gate-activation", action="store_true", default=False)
    g.add_argument("--md-no-true-term", action="store_true", default=False)
    g.add_argument("--md-no-confusing-term", action="store_true", default=False)
    g.add_argument(
        "--md-loss",
        default="official",
        choices=["official", "true_only", "share"],
        help="channel loss: official (true + confusing class terms), true_only, or share "
        "(irrelevant share of the true-class gradient, scale-invariant)",
    )
    g.add_argument(
        "--md-monitor",
        action="store_true",
        default=False,
        help="with --md-alpha 0: compute the channel term without gradients and log it "
        "(what the penalty would have been; with alpha > 0 it is logged anyway)",
    )
    g.add_argument(
        "--md-diagnosis", default="", help="reuse a saved diagnosis instead of diagnosing"
    )
    g.add_argument(
        "--md-diagnosis-split", default=None, help="split to diagnose on (default: --train-split)"
    )
    g.add_argument(
        "--md-allow-val-diagnosis",
        action="store_true",
        default=False,
        help="permit diagnosing on the validation split (leaks it)",
    )
    g.add_argument(
        "--md-masks", default="", help="folder of foreground masks from `md-doctor masks`"
    )
    g.add_argument(
        "--md-baseline-epochs",
        type=int,
        default=0,
        help="train this many plain epochs first when there is no checkpoint",
    )
    g.add_argument(
        "--md-eval-before",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the checkpoint before treatment (--no-md-eval-before skips that pass "
        "over the validation split, e.g. when it is the test set)",
    )
    g.add_argument(
        "--md-report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write report/ at the end of an MD run",
    )

    g = p.add_argument_group("Reliability")
    g.add_argument(
        "--max-bad-steps",
        type=int,
        default=20,
        help="abort after this many consecutive non-finite steps",
    )

    g = p.add_argument_group("Misc")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--recovery-interval", type=int, default=0)
    g.add_argument("--checkpoint-hist", type=int, default=10)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--output", default="", help="output root (default ./output/train)")
    g.add_argument("--experiment", default="", help="run folder name under --output")
    g.add_argument("--eval-metric", default="top1", choices=["top1", "top5", "loss"])
    g.add_argument(
        "--val-interval",
        type=int,
        default=1,
        help="evaluate every N epochs (and always after the last)",
    )
    g.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")

    g = p.add_argument_group("timm flags without effect here (accepted for compatibility)")
    g.add_argument("--no-prefetcher", action="store_true", default=False)
    g.add_argument("--pin-mem", action="store_true", default=False)
    g.add_argument("--worker-seeding", default="all")
    g.add_argument("--local_rank", "--local-rank", type=int, default=0)
    g.add_argument("--device-modules", nargs="*", default=None)

    g = p.add_argument_group("timm flags not supported yet (error unless left at the default)")
    for dest, (flag, default, kw) in UNSUPPORTED.items():
        g.add_argument(flag, dest=dest, default=default, help=argparse.SUPPRESS, **kw)
    return p


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


_BOOL_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse.BooleanOptionalAction,
)


def _convert(action: argparse.Action, key: str, value: Any, src: str) -> Any:
    """Type-check a YAML value against its flag and convert it (PyYAML reads 3e-4 as a string).

    Returns a value of the flag's own type (booleans for switches, lists for multi-value flags,
    values within ``choices``), or raises ConfigError.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{src}: key {key!r} {why}, got {value!r}")

    if isinstance(action, _BOOL_ACTIONS):
        if not isinstance(value, bool):
            raise bad("expects true/false")
        return value
    if isinstance(action, _KwargsAction):
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


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config into validated, typed parser defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}: {_yaml_error(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of flag names to values")
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key == "config":  # recorded in a run's args.yaml; re-using that file must work
            continue
        if key == "md" and isinstance(v, dict):
            v = dict(v)
            enabled = v.pop("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"{path}: key 'md.enabled' expects true/false, got {enabled!r}")
            flat["md"] = enabled
            for mk, mv in v.items():
                flat["md_" + str(mk).replace("-", "_")] = mv
        else:
            flat[key] = v
    actions = _actions(parser)
    out = {}
    for key, value in flat.items():
        if key not in actions:
            near = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{path}: unknown config key {key!r}{hint}")
        out[key] = _convert(actions[key], key, value, str(path))
    return out


def _number_checks(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """Ranges of the numeric timm flags; NaN fails every comparison, so it is refused too."""

    def opt(v, ok) -> bool:  # an optional flag left unset is fine
        return v is None or bool(ok(v))

    return [
        (
            opt(args.lr, lambda v: 0 < v < math.inf),
            f"--lr must be a positive number, got {args.lr}",
        ),
        (0 < args.lr_base < math.inf, f"--lr-base must be a positive number, got {args.lr_base}"),
        (0 <= args.warmup_lr < math.inf, f"--warmup-lr must be >= 0, got {args.warmup_lr}"),
        (0 <= args.min_lr < math.inf, f"--min-lr must be >= 0, got {args.min_lr}"),
        (
            0 <= args.weight_decay < math.inf,
            f"--weight-decay must be >= 0, got {args.weight_decay}",
        ),
        (0 <= args.momentum < math.inf, f"--momentum must be >= 0, got {args.momentum}"),
        (
            opt(args.clip_grad, lambda v: 0 < v < math.inf),
            f"--clip-grad must be > 0, got {args.clip_grad}",
        ),
        (0 <= args.drop < 1, f"--drop must be in [0, 1), got {args.drop}"),
        (
            opt(args.drop_path, lambda v: 0 <= v < 1),
            f"--drop-path must be in [0, 1), got {args.drop_path}",
        ),
        (
            opt(args.bn_momentum, lambda v: 0 <= v <= 1),
            f"--bn-momentum must be in [0, 1], got {args.bn_momentum}",
        ),
        (opt(args.bn_eps, lambda v: 0 < v < math.inf), f"--bn-eps must be > 0, got {args.bn_eps}"),
        (
            opt(args.validation_batch_size, lambda v: v >= 1),
            f"-vb/--validation-batch-size must be >= 1, got {args.validation_batch_size}",
        ),
        (
            opt(args.num_classes, lambda v: v >= 1),
            f"--num-classes must be >= 1, got {args.num_classes}",
        ),
        (opt(args.md_topk, lambda v: v >= 1), f"--md-topk must be >= 1, got {args.md_topk}"),
        (
            args.md_mask_rule != "topk" or args.md_topk is not None,
            "--md-mask-rule topk needs --md-topk K",
        ),
        (0 <= args.hflip <= 1, f"--hflip must be in [0, 1], got {args.hflip}"),
        (0 <= args.vflip <= 1, f"--vflip must be in [0, 1], got {args.vflip}"),
        (0 <= args.reprob <= 1, f"--reprob must be in [0, 1], got {args.reprob}"),
        (
            0 <= args.color_jitter < math.inf,
            f"--color-jitter must be >= 0, got {args.color_jitter}",
        ),
        (
            0 <= args.model_ema_decay <= 1,
            f"--model-ema-decay must be in [0, 1], got {args.model_ema_decay}",
        ),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (args.checkpoint_hist >= 0, f"--checkpoint-hist must be >= 0, got {args.checkpoint_hist}"),
    ]


def _validate(args: argparse.Namespace) -> None:
    for dest, (flag, default, _kw) in UNSUPPORTED.items():
        if getattr(args, dest) != default:
            raise ConfigError(
                f"{flag} is a timm train.py option that train_md.py does not support yet"
            )
    if args.data and not args.data_dir:
        args.data_dir = args.data
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be >= 1"),
        (0 <= args.md_alpha < math.inf, f"--md-alpha must be >= 0, got {args.md_alpha}"),
        (0 <= args.md_beta < math.inf, f"--md-beta must be >= 0, got {args.md_beta}"),
        (args.md_every >= 1, f"--md-every must be >= 1, got {args.md_every}"),
        (0.0 <= args.md_theta <= 1.0, f"--md-theta must be in [0, 1], got {args.md_theta}"),
        (args.md_per_class >= 1, f"--md-per-class must be >= 1, got {args.md_per_class}"),
        (0.0 <= args.md_min_confidence <= 1.0, "--md-min-confidence must be in [0, 1]"),
        (
            bool(str(args.md_layers).strip(" ,")),
            "--md-layers is empty: give at least one layer spec",
        ),
        (args.imb_ratio > 1, f"--imb-ratio must be > 1, got {args.imb_ratio}"),
        (0.0 <= args.smoothing < 1.0, f"--smoothing must be in [0, 1), got {args.smoothing}"),
        (args.max_bad_steps >= 1, "--max-bad-steps must be >= 1"),
        (args.md_baseline_epochs >= 0, "--md-baseline-epochs must be >= 0"),
        (args.workers >= 0, "--workers must be >= 0"),
        (args.val_interval >= 1, f"--val-interval must be >= 1, got {args.val_interval}"),
        *_number_checks(args),
        (
            args.sampler_epoch_length is None or args.sampler_epoch_length >= 1,
            f"--sampler-epoch-length must be >= 1, got {args.sampler_epoch_length}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if args.md_loss != "official" and args.md_no_true_term:
        raise ConfigError(
            f"--md-loss {args.md_loss} is the true-class term: it cannot be combined with "
            "--md-no-true-term"
        )
    if args.md_masks and (args.class_map or args.class_cap or args.val_from_train):
        raise ConfigError(
            "--md-masks are keyed by position in the full training split; they cannot be combined "
            "with --class-map, --class-cap or --val-from-train yet"
        )
    if args.md and args.md_beta > 0 and not args.md_masks:
        raise ConfigError(
            "--md-beta > 0 needs --md-masks (foreground masks from `md-doctor masks`)"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: YAML defaults, then the command line."""
    config_parser = _Parser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, remaining = config_parser.parse_known_args(argv)
    parser = create_parser()
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(remaining)
    args.config = known.config
    _validate(args)
    return args


def args_to_yaml_dict(args: argparse.Namespace) -> dict[str, Any]:
    """What ``args.yaml`` records: every dest, YAML-safe."""
    out = {}
    for k, v in vars(args).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out
