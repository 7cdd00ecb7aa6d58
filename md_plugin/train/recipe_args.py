"""The training-recipe flags of ``train_md.py``: optimizer, schedule, augmentation, loss, EMA.

timm's names, types and defaults, each with a one-line help; one function per flag group, called
by :func:`md_plugin.train.args.create_parser` (which owns the parser and the group titles).
"""

from __future__ import annotations

import argparse

from ..config import KwargsAction

__all__ = [
    "add_crop_flip_flags",
    "add_colour_erase_flags",
    "add_ema_flags",
    "add_loss_sampling_flags",
    "add_lr_flags",
    "add_mixup_flags",
    "add_optimizer_flags",
    "add_schedule_flags",
]

_Group = argparse._ArgumentGroup


def _float_or_none(v: str) -> float | None:
    return None if str(v).lower() in ("none", "null", "") else float(v)


def add_optimizer_flags(g: _Group) -> None:
    """timm's optimizer flags: --opt, its eps/betas/kwargs, momentum, weight decay, clipping, layer decay.

    Args:
        g: the argument group to fill.
    """
    g.add_argument("--opt", default="sgd", help="timm optimizer name (sgd, adamw, lamb, ...)")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")  # fmt: skip
    g.add_argument(
        "--opt-betas", type=float, nargs="+", default=None,
        help="optimizer betas (default: the optimizer's)",
    )  # fmt: skip
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=2e-5, help="weight decay")
    g.add_argument(
        "--clip-grad", type=_float_or_none, default=None, help="clip gradients at this value"
    )
    g.add_argument(
        "--clip-mode", default="norm", choices=["norm", "value", "agc"],
        help="what --clip-grad bounds: the norm, each value, or adaptive (AGC)",
    )  # fmt: skip
    g.add_argument(
        "--opt-kwargs", nargs="*", default={}, action=KwargsAction, metavar="K=V",
        help="extra keyword arguments of the optimizer",
    )  # fmt: skip
    g.add_argument(
        "--layer-decay", type=float, default=None, help="layer-wise lr decay (timm optimizer)"
    )
    g.add_argument(
        "--layer-decay-min-scale", type=float, default=0.0,
        help="with --layer-decay: the smallest lr scale of a layer",
    )  # fmt: skip
    g.add_argument(
        "--layer-decay-no-opt-scale", type=float, default=None,
        help="with --layer-decay: layers below this scale are not optimised",
    )  # fmt: skip


def add_lr_flags(g: _Group) -> None:
    """The learning rate and its shape: --lr/--lr-base scaling, noise, cycles, warm-up, --min-lr.

    Args:
        g: the argument group to fill.
    """
    g.add_argument(
        "--lr",
        type=_float_or_none,
        default=None,
        help="absolute lr; default: --lr-base scaled by batch size",
    )
    g.add_argument("--lr-base", type=float, default=0.1, help="lr at --lr-base-size images")
    g.add_argument(
        "--lr-base-size", type=int, default=256, help="global batch size --lr-base is meant for"
    )
    g.add_argument(
        "--lr-base-scale", default="", choices=["", "linear", "sqrt"],
        help="how --lr-base scales with the batch size ('': sqrt for adaptive optimizers, "
        "else linear)",
    )  # fmt: skip
    g.add_argument(
        "--lr-noise", type=float, nargs="+", default=None, metavar="PCT",
        help="epoch fractions between which the lr gets noise",
    )  # fmt: skip
    g.add_argument("--lr-noise-pct", type=float, default=0.67, help="lr noise limit")
    g.add_argument("--lr-noise-std", type=float, default=1.0, help="lr noise standard deviation")
    g.add_argument(
        "--lr-cycle-mul", type=float, default=1.0, help="length multiplier of each lr cycle"
    )
    g.add_argument(
        "--lr-cycle-decay", type=float, default=0.5, help="lr decay from one cycle to the next"
    )
    g.add_argument("--lr-cycle-limit", type=int, default=1, help="number of lr cycles")
    g.add_argument("--lr-k-decay", type=float, default=1.0, help="k-decay of cosine/poly")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="lr at the start of warm-up")
    g.add_argument("--min-lr", type=float, default=0.0, help="the schedule's lowest lr")
    g.add_argument("--warmup-epochs", type=int, default=5, help="linear lr warm-up epochs")
    g.add_argument(
        "--warmup-prefix", action="store_true", default=False,
        help="warm-up epochs come before --epochs instead of within them",
    )  # fmt: skip
    g.add_argument("--lr-decay-fn", default=None, help="decay function of wsd/rsqrt (timm 1.0.31)")
    g.add_argument(
        "--lr-stable-timescale", type=float, default=None, help="rsqrt timescale (timm 1.0.31)"
    )


def add_schedule_flags(g: _Group) -> None:
    """The schedule: --sched, --epochs and each schedule's decay/cool-down/patience.

    Args:
        g: the argument group to fill.
    """
    g.add_argument(
        "--sched", default="cosine",
        help="timm lr schedule: cosine, tanh, step, multistep, plateau, poly, wsd, rsqrt, "
        "constant, none",
    )  # fmt: skip
    g.add_argument(
        "--sched-on-updates", action="store_true", default=False,
        help="step the schedule every optimizer update, not every epoch",
    )  # fmt: skip
    g.add_argument("--epochs", type=int, default=300, help="epochs to train")
    g.add_argument(
        "--start-epoch", type=int, default=None, help="start at this epoch (default: 0, or "
        "the --resume checkpoint's next)"
    )  # fmt: skip
    g.add_argument(
        "--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="EPOCH",
        help="multistep: epochs where the lr decays by --decay-rate",
    )  # fmt: skip
    g.add_argument(
        "--decay-epochs", type=float, default=90.0, help="step: decay every this many epochs"
    )
    g.add_argument(
        "--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule"
    )
    g.add_argument(
        "--patience-epochs", type=int, default=10, help="plateau: epochs without improvement"
    )
    g.add_argument(
        "--decay-rate", "--dr", type=float, default=0.1, help="step/multistep/plateau lr factor"
    )


def add_crop_flip_flags(g: _Group) -> None:
    """Geometric augmentation: crop mode, crop padding, scale/ratio, flips, interpolation.

    Args:
        g: the argument group to fill.
    """
    g.add_argument(
        "--no-aug", action="store_true", default=False, help="no training augmentation at all"
    )
    g.add_argument(
        "--train-crop-mode",
        default=None,
        choices=["rrc", "rkrc", "rkrr"],
        help="rrc: RandomResizedCrop (default); rkrc/rkrr: keep-ratio resize, centre/random crop",
    )
    g.add_argument(
        "--crop-padding",
        type=int,
        default=None,
        help="pad-and-random-crop (CIFAR: 4) instead of RandomResizedCrop",
    )
    g.add_argument(
        "--scale", type=float, nargs=2, default=[0.08, 1.0], metavar="F",
        help="RandomResizedCrop area range",
    )  # fmt: skip
    g.add_argument(
        "--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0], metavar="R",
        help="RandomResizedCrop aspect-ratio range",
    )  # fmt: skip
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    g.add_argument(
        "--train-interpolation",
        default="random",
        help="random (bilinear or bicubic per image), bilinear, bicubic, nearest",
    )


def add_colour_erase_flags(g: _Group) -> None:
    """Photometric augmentation, auto-augment, repeated augmentation and random erasing.

    Args:
        g: the argument group to fill.
    """
    g.add_argument(
        "--color-jitter", type=float, default=0.4, help="colour jitter strength; null in YAML: off"
    )
    g.add_argument(
        "--color-jitter-prob", type=float, default=None, help="probability of colour jitter"
    )
    g.add_argument("--grayscale-prob", type=float, default=None, help="probability of grayscale")
    g.add_argument(
        "--gaussian-blur-prob", type=float, default=None, help="probability of Gaussian blur"
    )
    g.add_argument(
        "--aa",
        default=None,
        help="timm auto-augment spec: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, ...",
    )
    g.add_argument(
        "--aug-repeats",
        type=float,
        default=0.0,
        help="repeated augmentation: each image this many times per epoch (RepeatAugSampler)",
    )
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument(
        "--remode", default="pixel", choices=["const", "rand", "pixel"],
        help="random erasing fill: constant, random per box, random per pixel",
    )  # fmt: skip
    g.add_argument("--recount", type=int, default=1, help="random erasing: at most this many boxes")
    g.add_argument(
        "--resplit",
        action="store_true",
        default=False,
        help="random erasing spares the first half of each batch (timm's clean split)",
    )


def add_mixup_flags(g: _Group) -> None:
    """Mixup/cutmix, label smoothing and timm's binary cross-entropy.

    Args:
        g: the argument group to fill.
    """
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (> 0 enables)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (> 0 enables)")
    g.add_argument(
        "--cutmix-minmax", type=float, nargs="+", default=None, metavar="F",
        help="cutmix box size range (enables cutmix, overrides --cutmix)",
    )  # fmt: skip
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument(
        "--mixup-switch-prob", type=float, default=0.5,
        help="probability of cutmix instead of mixup when both are on",
    )  # fmt: skip
    g.add_argument(
        "--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
        help="one mix per batch, per pair of images, or per image",
    )  # fmt: skip
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true", default=False, help="binary cross-entropy")
    g.add_argument(
        "--bce-sum", action="store_true", default=False, help="BCE: sum over classes, not mean"
    )
    g.add_argument(
        "--bce-target-thresh", type=float, default=None, help="BCE: binarise targets above this"
    )
    g.add_argument(
        "--bce-pos-weight", type=float, default=None, help="BCE: weight of the positive class"
    )


def add_loss_sampling_flags(g: _Group) -> None:
    """The long-tail losses (--loss and their parameters), DRW and the class samplers.

    Args:
        g: the argument group to fill.
    """
    g.add_argument(
        "--loss",
        default="ce",
        help="ce, focal, reduced_focal, cb_ce, cb_focal, ldam, balanced_softmax, logit_adjust",
    )
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal losses: gamma")
    g.add_argument(
        "--rfl-threshold", type=float, default=0.5, help="reduced_focal: the confidence "
        "threshold"
    )  # fmt: skip
    g.add_argument(
        "--cb-beta", type=float, default=0.9999, help="cb_*: beta of the effective number"
    )
    g.add_argument("--ldam-max-m", type=float, default=0.5, help="ldam: the largest margin")
    g.add_argument("--ldam-s", type=float, default=30.0, help="ldam: logit scale")
    g.add_argument("--la-tau", type=float, default=1.0, help="logit_adjust: tau")
    g.add_argument(
        "--drw-epoch", type=int, default=None, help="deferred re-weighting from this epoch"
    )
    g.add_argument("--sampler", default="", help="'' (shuffle), class_balanced, sqrt, progressive")
    g.add_argument(
        "--sampler-k", type=int, default=4, help="class-balanced: samples per class visit"
    )
    g.add_argument(
        "--sampler-epoch-length",
        type=int,
        default=None,
        help="images per epoch (also without --sampler: a fresh random subset each epoch)",
    )


def add_ema_flags(g: _Group) -> None:
    """timm's model EMA.

    Args:
        g: the argument group to fill.
    """
    g.add_argument(
        "--model-ema", action="store_true", default=False, help="keep an EMA of the weights"
    )
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    g.add_argument(
        "--model-ema-warmup", action="store_true", default=False,
        help="ramp the EMA decay up over the first steps",
    )  # fmt: skip
