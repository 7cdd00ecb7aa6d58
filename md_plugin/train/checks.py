"""The checks of ``train_md.py``'s arguments: ranges, combinations and timm's old aliases.

Every refusal is one ``ConfigError`` line naming the flag, before any data or model is loaded.
A short run whose warm-up is longer than the run is one warning (timm's default of 5 warm-up
epochs silently swallows a 2-epoch run).
"""

from __future__ import annotations

import argparse
import math
import re
import warnings

from ..errors import ConfigError
from .timm_compat import check_refused, mixup_active

__all__ = ["validate_args", "warn_short_run"]

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_TRAIN_INTERPOLATIONS = ("", "random", "bilinear", "bicubic", "nearest")


def _normalise(args: argparse.Namespace) -> None:
    """Map timm's aliases and older keys onto the flags that implement them."""
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if args.native_amp:  # timm < 0.8: --native-amp chose torch AMP
        args.amp = True
    if args.validation_batch_size is None and args.validation_batch_size_multiplier != 1:
        args.validation_batch_size = args.batch_size * args.validation_batch_size_multiplier
    if args.drop_connect is not None:  # timm: deprecated name of drop_path
        if args.drop_path is not None and args.drop_path != args.drop_connect:
            raise ConfigError(
                f"--drop-connect {args.drop_connect} and --drop-path {args.drop_path} disagree: "
                "--drop-connect is timm's old name of --drop-path, give one"
            )
        args.drop_path = args.drop_connect


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
            opt(args.color_jitter, lambda v: 0 <= v < math.inf),  # None (YAML null): no jitter
            f"--color-jitter must be >= 0, got {args.color_jitter}",
        ),
        (
            0 <= args.model_ema_decay <= 1,
            f"--model-ema-decay must be in [0, 1], got {args.model_ema_decay}",
        ),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (args.checkpoint_hist >= 0, f"--checkpoint-hist must be >= 0, got {args.checkpoint_hist}"),
    ]


def validate_args(args: argparse.Namespace) -> None:
    """Refuse what train_md.py cannot honour, each in one line, and map timm's aliases.

    Args:
        args: the parsed namespace; timm's old aliases are mapped onto the flags in place
            (``--native-amp`` -> ``--amp``, ``data`` -> ``--data-dir``, ...).

    Raises:
        ConfigError: a refused timm flag, a value out of range, or a combination that cannot
            be honoured.
    """
    check_refused(args)
    _normalise(args)
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
    probs = ("mixup_prob", "mixup_switch_prob", "color_jitter_prob",
             "grayscale_prob", "gaussian_blur_prob")  # fmt: skip
    for name in probs:
        v = getattr(args, name)
        checks.append((v is None or 0.0 <= v <= 1.0, f"--{name.replace('_', '-')} must be in [0, 1], got {v}"))  # fmt: skip
    mm = args.cutmix_minmax
    checks += [
        (0 <= args.mixup < math.inf and 0 <= args.cutmix < math.inf, "--mixup and --cutmix must be finite and >= 0"),
        (mm is None or (len(mm) == 2 and 0 < mm[0] <= mm[1] <= 1),
         f"--cutmix-minmax takes two fractions 0 < min <= max <= 1, got {mm}"),
        (args.recount >= 1, f"--recount must be >= 1, got {args.recount}"),
        (0 <= args.aug_repeats < math.inf, f"--aug-repeats must be >= 0, got {args.aug_repeats}"),
        (args.layer_decay is None or 0 < args.layer_decay < math.inf, "--layer-decay must be > 0"),
        (args.validation_batch_size_multiplier >= 1, "--validation-batch-size-multiplier must be >= 1"),
        (args.train_interpolation in _TRAIN_INTERPOLATIONS,
         f"--train-interpolation {args.train_interpolation!r}: choose from random, bilinear, bicubic, nearest"),
        (args.device is None or bool(_DEVICE.match(str(args.device))),
         f"--device {args.device!r}: use cpu, cuda or cuda:N (other backends: let accelerate pick, no --device)"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _check_combinations(args)
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


def _check_combinations(args: argparse.Namespace) -> None:
    """Recipe combinations that cannot be honoured: refused in one line each."""
    soft = mixup_active(args) or args.bce_loss
    if soft and args.loss != "ce":
        what = "--mixup/--cutmix" if mixup_active(args) else "--bce-loss"
        raise ConfigError(
            f"--loss {args.loss} needs integer labels: it cannot be combined with {what} "
            "(timm's soft-target / binary cross-entropy replaces --loss ce)"
        )
    if soft and args.drw_epoch is not None:
        raise ConfigError(
            "--drw-epoch re-weights --loss ce; it cannot be combined with mixup/cutmix or --bce-loss"
        )
    if args.aug_repeats and args.sampler_epoch_length:
        raise ConfigError("--aug-repeats and --sampler-epoch-length both set the epoch: use one")
    if args.aug_repeats and args.sampler:
        raise ConfigError(
            f"--aug-repeats and --sampler {args.sampler} both choose the samples: use one"
        )
    if args.md and args.md_masks:
        moves = []
        if args.aa:
            moves.append(f"--aa {args.aa} (its rotate/shear/translate ops cannot move the masks)")
        if mixup_active(args):
            moves.append("--mixup/--cutmix (a mixed image has no single foreground mask)")
        if args.train_crop_mode in ("rkrc", "rkrr"):
            moves.append(
                f"--train-crop-mode {args.train_crop_mode} (masks follow rrc and --crop-padding only)"
            )
        if moves:
            raise ConfigError(
                "--md-masks (spatial term) cannot be used with "
                + "; ".join(moves)
                + ": drop the augmentation or the masks"
            )


def warn_short_run(args: argparse.Namespace) -> None:
    """One warning when the learning-rate warm-up lasts the whole run.

    timm's default ``--warmup-epochs 5`` with ``--epochs 2`` never leaves the warm-up: the lr
    climbs from ``--warmup-lr`` and never reaches ``--lr``. ``--warmup-prefix`` adds the warm-up
    to the run instead, and ``--sched none`` has no warm-up.

    Args:
        args: the parsed, validated namespace.
    """
    if args.sched == "none" or args.warmup_prefix or not 0 < args.epochs <= args.warmup_epochs:
        return
    warnings.warn(
        f"--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the whole run is "
        f"learning-rate warm-up (the lr starts at --warmup-lr {args.warmup_lr:g} and never "
        "reaches its target); lower --warmup-epochs or add --warmup-prefix",
        UserWarning,
        stacklevel=3,
    )
