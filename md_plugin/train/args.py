"""Command line of ``train_md.py``: every key of timm train.py's parser plus Model Doctor flags.

Parsing is two-stage like timm (:mod:`md_plugin.config`): ``-c/--config FILE.yaml`` sets
defaults, the command line wins. The flags are declared one group per function below, in the
order ``--help`` lists them. Every key that timm's ``train.py`` writes to ``args.yaml`` (0.5.x to
1.0.31 and HEAD) is a flag here; those that train nothing here (no-ops, flags that act only with
another flag, refused flags) are tabled in :mod:`md_plugin.train.timm_compat` and listed only by
``--help-all``. The checks of the parsed values are in :mod:`md_plugin.train.checks`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..config import KwargsAction, Parser, apply_config, args_to_yaml_dict, load_config
from ..data.split import parse_count_or_fraction
from ..errors import ConfigError
from .checks import validate_args, warn_short_run
from .recipe_args import (
    add_colour_erase_flags,
    add_crop_flip_flags,
    add_ema_flags,
    add_loss_sampling_flags,
    add_lr_flags,
    add_mixup_flags,
    add_optimizer_flags,
    add_schedule_flags,
)
from .timm_compat import (
    INERT,
    NO_OPS,
    NULL_VALUES,
    REFUSED,
    UNSUPPORTED,
    add_timm_compat_flags,
    mixup_active,
    warn_inert,
)

__all__ = [
    "INERT",
    "NO_OPS",
    "NULL_VALUES",
    "REFUSED",
    "UNSUPPORTED",
    "apply_config",
    "args_to_yaml_dict",
    "create_parser",
    "load_config",
    "mixup_active",
    "parse_args",
]

_Group = argparse._ArgumentGroup


def _count_or_fraction(v: str) -> int | float | None:
    if str(v).lower() in ("none", "null", ""):
        return None
    try:
        return parse_count_or_fraction(v)
    except ConfigError as e:  # argparse then names the flag
        raise argparse.ArgumentTypeError(str(e)) from None


def _dataset_flags(g: _Group) -> None:
    g.add_argument(
        "data", nargs="?", metavar="DIR", default=None, help="(deprecated) same as --data-dir"
    )
    g.add_argument("--data-dir", default=None, help="dataset root folder")
    g.add_argument(
        "--dataset",
        default="",
        help="'' (folder), torch/cifar10, torch/cifar100, cifar10_lt, cifar100_lt, "
        "sklearn/digits, or any timm dataset name",
    )
    g.add_argument("--train-split", default="train", help="split to train on")
    g.add_argument(
        "--val-split", default="validation", help="split to evaluate on (the test set with "
        "--val-from-train)"
    )  # fmt: skip
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
    g.add_argument(
        "--imb-type", default="exp", choices=["exp", "step"], help="long-tailed CIFAR profile"
    )
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


def _model_flags(g: _Group) -> None:
    g.add_argument(
        "--model", default="resnet50", help="timm model name, e.g. resnet32_cifar, resnet18"
    )
    g.add_argument(
        "--pretrained", action="store_true", default=False, help="start from timm's pretrained "
        "weights"
    )  # fmt: skip
    g.add_argument(
        "--pretrained-path",
        default=None,
        help="with --pretrained: read those weights from this file",
    )
    g.add_argument("--initial-checkpoint", default="", help="load these weights before training")
    g.add_argument(
        "--resume", default="", help="resume the full training state from this checkpoint"
    )
    g.add_argument(
        "--no-resume-opt",
        action="store_true",
        default=False,
        help="with --resume: restore the weights only, with a new optimizer and schedule",
    )
    g.add_argument(
        "--num-classes", type=int, default=None, help="classifier outputs (default: the data's)"
    )
    g.add_argument("--gp", default=None, help="global pool type (default: the model's)")
    g.add_argument("--img-size", type=int, default=None, help="square image size")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (default: 3)")
    g.add_argument(
        "--input-size", type=int, nargs=3, default=None, metavar="N",
        help="C H W of the input (default: the model's)",
    )  # fmt: skip
    g.add_argument("--crop-pct", type=float, default=None, help="evaluation centre-crop fraction")
    g.add_argument(
        "--mean", type=float, nargs="+", default=None, help="normalisation mean per channel"
    )
    g.add_argument(
        "--std", type=float, nargs="+", default=None, help="normalisation std per channel"
    )
    g.add_argument(
        "--interpolation", default="", help="resize interpolation (default: the model's)"
    )
    g.add_argument(
        "--model-kwargs", nargs="*", default={}, action=KwargsAction, metavar="K=V",
        help="extra keyword arguments of timm.create_model, e.g. img_size=32",
    )  # fmt: skip
    g.add_argument("--channels-last", action="store_true", default=False,
                   help="channels-last memory layout")  # fmt: skip
    g.add_argument(
        "--grad-checkpointing", action="store_true", default=False,
        help="recompute activations in the backward pass to save memory",
    )  # fmt: skip
    g.add_argument(
        "--head-init-scale", type=float, default=None, help="scale the classifier's initial weights"
    )
    g.add_argument(
        "--head-init-bias", type=float, default=None, help="set the classifier's initial bias"
    )


def _batch_flags(g: _Group) -> None:
    g.add_argument("-b", "--batch-size", type=int, default=128, help="training batch size")
    g.add_argument(
        "-vb", "--validation-batch-size", type=int, default=None,
        help="evaluation batch size (default: --batch-size)",
    )  # fmt: skip
    g.add_argument(
        "--validation-batch-size-multiplier",
        type=int,
        default=1,
        help="(older timm) validation batch = this x --batch-size when -vb is not given",
    )
    g.add_argument("--grad-accum-steps", type=int, default=1, help="batches per optimizer step")


def _regularisation_flags(g: _Group) -> None:
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate before the classifier")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument(
        "--drop-connect",
        type=float,
        default=None,
        help="timm's deprecated name of --drop-path (used when --drop-path is not given)",
    )
    g.add_argument(
        "--drop-block", type=float, default=None, help="DropBlock rate (timm's drop_block_rate)"
    )
    g.add_argument(
        "--bn-momentum", type=float, default=None, help="BatchNorm momentum (default: the model's)"
    )
    g.add_argument("--bn-eps", type=float, default=None, help="BatchNorm epsilon (default: the model's)")  # fmt: skip


def _device_flags(g: _Group) -> None:
    g.add_argument(
        "--amp", action="store_true", default=False, help="mixed precision (see --amp-dtype)"
    )
    g.add_argument(
        "--amp-dtype", default="float16", choices=["float16", "bfloat16"],
        help="the lower precision of --amp",
    )  # fmt: skip
    g.add_argument(
        "--device",
        default=None,
        help="'cpu' forces CPU; 'cuda' (timm's default) or unset: accelerate picks; "
        "'cuda:N' selects GPU N in a single process",
    )
    g.add_argument(
        "--native-amp", action="store_true", default=False, help="(older timm) same as --amp"
    )
    g.add_argument(
        "--device-modules",
        nargs="*",
        default=None,
        help="import these Python modules first (e.g. to register models or a device backend)",
    )
    g.add_argument(
        "--no-ddp-bb", action="store_true", default=False,
        help="several processes: do not broadcast BatchNorm buffers every step",
    )  # fmt: skip
    g.add_argument(
        "--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
        help="several processes: average (reduce) or copy (broadcast) BatchNorm statistics "
        "before each evaluation; '' leaves them per process",
    )  # fmt: skip


def _md_treatment_flags(g: _Group) -> None:
    g.add_argument(
        "--md",
        action="store_true",
        default=False,
        help="diagnose, then fine-tune with the Model Doctor losses",
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
    g.add_argument(
        "--md-no-true-term", action="store_true", default=False,
        help="leave out the true-class term of the channel loss",
    )  # fmt: skip
    g.add_argument(
        "--md-no-confusing-term", action="store_true", default=False,
        help="leave out the confusing-class term of the channel loss",
    )  # fmt: skip
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


def _md_diagnosis_flags(g: _Group) -> None:
    g.add_argument(
        "--md-layers",
        default="last_conv",
        help="comma-separated layer specs: last_conv, penultimate_fc, conv:-2, names, globs",
    )
    g.add_argument(
        "--md-grad-mode", default="relu", choices=["relu", "abs"],
        help="channel score: positive part or magnitude of the true-class gradient",
    )  # fmt: skip
    g.add_argument(
        "--md-gate-activation", action="store_true", default=False,
        help="score a channel only where its activation is positive",
    )  # fmt: skip
    g.add_argument(
        "--md-mask-rule", default="theta", choices=["theta", "mean", "topk"],
        help="relevant channels: normalised score > --md-theta, >= the class mean, or the top k",
    )  # fmt: skip
    g.add_argument("--md-theta", type=float, default=0.2, help="threshold of --md-mask-rule theta")
    g.add_argument("--md-topk", type=int, default=None, help="k of --md-mask-rule topk")
    g.add_argument(
        "--md-per-class",
        type=int,
        default=50,
        help="high-confidence images per class for diagnosis",
    )
    g.add_argument(
        "--md-min-confidence", type=float, default=0.0,
        help="diagnose only images whose true-class probability is at least this",
    )  # fmt: skip
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


def _run_flags(g: _Group) -> None:
    g.add_argument("--seed", type=int, default=42, help="random seed of the run")
    g.add_argument("--log-interval", type=int, default=50, help="log every this many batches")
    g.add_argument(
        "--checkpoint-hist", type=int, default=10, help="keep this many best checkpoints"
    )
    g.add_argument("-j", "--workers", type=int, default=4, help="data loader processes")
    g.add_argument(
        "--pin-mem", action="store_true", default=False, help="pinned memory in the DataLoaders"
    )
    g.add_argument("--output", default="", help="output root (default ./output/train)")
    g.add_argument("--experiment", default="", help="run folder name under --output")
    g.add_argument(
        "--eval-metric", default="top1", choices=["top1", "top5", "loss"],
        help="the metric that selects the best checkpoint",
    )  # fmt: skip
    g.add_argument(
        "--val-interval",
        type=int,
        default=1,
        help="evaluate every N epochs (and always after the last)",
    )
    g.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")
    g.add_argument(
        "--ignore-unknown-keys",
        action="store_true",
        default=False,
        help="config keys no timm version knows become one warning instead of an error",
    )
    g.add_argument(
        "--max-bad-steps",
        type=int,
        default=20,
        help="abort after this many consecutive non-finite steps",
    )


# (title, the functions that fill that group), in --help order
_GROUPS = (
    ("Dataset", (_dataset_flags,)),
    ("Model", (_model_flags, _batch_flags, _regularisation_flags)),
    ("Device and precision (accelerate)", (_device_flags,)),
    ("Optimizer", (add_optimizer_flags,)),
    ("Learning rate schedule", (add_schedule_flags, add_lr_flags)),
    (
        "Augmentation and regularisation",
        (add_crop_flip_flags, add_colour_erase_flags, add_mixup_flags),
    ),
    ("Classification loss and sampling (long-tailed data)", (add_loss_sampling_flags,)),
    ("Model EMA", (add_ema_flags,)),
    ("Model Doctor", (_md_treatment_flags, _md_diagnosis_flags)),
    ("Run, output and reliability", (_run_flags,)),
)


def create_parser() -> Parser:
    """The ``train_md.py`` parser: timm's flags and Model Doctor's, one group per concern.

    Returns:
        A :class:`~md_plugin.config.Parser` (one-line errors; ``--help`` shows every default,
        ``--help-all`` adds the timm-compatibility flags that train nothing here).
    """
    p = Parser(
        prog="train_md.py",
        usage="%(prog)s [-h] [--help-all] [-c FILE] [--model NAME] [--dataset NAME] "
        "[--data-dir DIR] [--md] [options]",
        description="timm-compatible training with Model Doctor diagnosis and treatment",
        null_values=NULL_VALUES,
    )
    p.add_argument(
        "-c", "--config", default="", metavar="FILE", help="YAML config (keys = flag dest names)"
    )
    for title, fill in _GROUPS:
        g = p.add_argument_group(title)
        for add in fill:
            add(g)
    add_timm_compat_flags(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse (YAML defaults, then the command line), then the checks.

    Args:
        argv: the command line without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The validated namespace.

    Raises:
        ConfigError: one line for a bad file, key, flag, value or combination.
    """
    parser = create_parser()
    apply_config(parser, argv, ignore_unknown_flag=True)
    argv = list(argv) if argv is not None else None
    args = parser.parse_args(argv)
    validate_args(args)
    warn_inert(args, {a.dest: a.default for a in create_parser()._actions})  # not the YAML's
    warn_short_run(args)
    return args
