"""Command line of ``train_md.py``: every key of timm train.py's parser plus Model Doctor flags.

Parsing is two-stage like timm: ``-c/--config FILE.yaml`` sets defaults, the command line wins.
Every key that timm's ``train.py`` writes to ``args.yaml`` (0.5.x to 1.0.31 and HEAD) is a flag
here, listed in ``--help`` under one of: implemented; accepted at any value because it only
tunes timm machinery that accelerate replaces (``NO_OPS``); accepted because it only matters
together with another flag (``INERT``, one warning when the other flag is off, as timm ignores
it too); or refused with one line unless it has its default value (``REFUSED``).

Unlike timm, keys that no timm version knows are all reported in one error (``--ignore-unknown-keys``
makes that one warning), YAML strings such as ``3e-4`` are converted with each flag's own type,
``null`` is accepted where timm's code accepts ``None`` (``NULL_VALUES``), and an ``md:`` block's
keys are the ``--md-*`` flags without the prefix.
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..config import KwargsAction, Parser, apply_config, args_to_yaml_dict, load_config
from ..errors import ConfigError

__all__ = [
    "apply_config",
    "create_parser",
    "parse_args",
    "load_config",
    "REFUSED",
    "UNSUPPORTED",
    "INERT",
    "NO_OPS",
    "NULL_VALUES",
    "args_to_yaml_dict",
    "mixup_active",
]


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


class Refused(NamedTuple):
    """A timm flag train_md.py refuses unless it has its default value."""

    flag: str
    default: Any
    kwargs: dict[str, Any]
    why: str


_STORE_TRUE: dict[str, Any] = {"action": "store_true"}

# timm train.py flags refused unless at their default: dest -> Refused(flag, default, kwargs, why)
REFUSED: dict[str, Refused] = {
    "train_num_samples": Refused("--train-num-samples", None, {"type": int}, "only for iterable (tfds/wds) datasets, which are not supported"),
    "val_num_samples": Refused("--val-num-samples", None, {"type": int}, "only for iterable (tfds/wds) datasets, which are not supported"),
    "input_img_mode": Refused("--input-img-mode", None, {}, "datasets are read as RGB"),
    "input_key": Refused("--input-key", None, {}, "only for hfds/wds datasets, which are not supported"),
    "target_key": Refused("--target-key", None, {}, "only for hfds/wds datasets, which are not supported"),
    "dataset_trust_remote_code": Refused("--dataset-trust-remote-code", False, _STORE_TRUE, "Hugging Face datasets are not supported"),
    "aug_splits": Refused("--aug-splits", 0, {"type": int}, "AugMix split batches are not supported (--aa augmix works without splits)"),
    "jsd_loss": Refused("--jsd-loss", False, _STORE_TRUE, "needs --aug-splits, which is not supported"),
    "split_bn": Refused("--split-bn", False, _STORE_TRUE, "needs --aug-splits, which is not supported"),
    "sync_bn": Refused("--sync-bn", False, _STORE_TRUE, "SyncBatchNorm has no double backward (Model Doctor) and is not supported"),
    "torchscript": Refused("--torchscript", False, _STORE_TRUE, "scripted models cannot carry the forward hooks"),
    "torchcompile": Refused("--torchcompile", None, {"nargs": "?", "const": "inductor"}, "torch.compile breaks the double backward of Model Doctor"),
    "fuser": Refused("--fuser", "", {}, "TorchScript fusers only apply to --torchscript"),
    "fast_norm": Refused("--fast-norm", False, _STORE_TRUE, "timm's fast norm kernels are not supported"),
    "model_dtype": Refused("--model-dtype", None, {}, "use --amp / --amp-dtype (accelerate mixed precision)"),
    "model_ema_force_cpu": Refused("--model-ema-force-cpu", False, _STORE_TRUE, "the EMA copy is kept on the training device"),
    "log_wandb": Refused("--log-wandb", False, _STORE_TRUE, "Weights & Biases logging is not supported"),
    "tta": Refused("--tta", 0, {"type": int}, "test-time augmentation is not supported"),
    "save_images": Refused("--save-images", False, _STORE_TRUE, "saving training batches as images is not supported"),
    "epoch_repeats": Refused("--epoch-repeats", 0.0, {"type": float}, "epoch repeats are not supported"),
    "recovery_interval": Refused("--recovery-interval", 0, {"type": int}, "recovery-*.pth.tar is not written; a SIGINT/SIGTERM saves a resumable last.pth.tar instead"),
    "kd_model_name": Refused("--kd-model-name", None, {}, "knowledge distillation is not supported"),
    "naflex_loader": Refused("--naflex-loader", False, _STORE_TRUE, "the NaFlex loader is not supported"),
    "train_img_sizes": Refused("--train-img-sizes", None, {"type": int, "nargs": "+"}, "variable training image sizes are not supported"),
    "train_batches_per_epoch": Refused("--train-batches-per-epoch", None, {"type": int}, "fixed-length epochs are not supported (see --sampler-epoch-length)"),
    "stop_epoch": Refused("--stop-epoch", None, {"type": int}, "not supported; use --epochs and --resume"),
    "save_epochs": Refused("--save-epochs", None, {"type": int, "nargs": "+"}, "milestone checkpoints are not supported"),
    "pretrained_cfg_overlay": Refused("--pretrained-cfg-overlay", {}, {"nargs": "*"}, "not supported; use --pretrained-path"),
    # keys of older timm versions
    "apex_amp": Refused("--apex-amp", False, _STORE_TRUE, "NVIDIA apex is not supported; use --amp"),
    "amp_impl": Refused("--amp-impl", "native", {}, "only native torch AMP ('native') is supported"),
    "aot_autograd": Refused("--aot-autograd", False, _STORE_TRUE, "AOT autograd breaks the double backward of Model Doctor"),
    "bn_tf": Refused("--bn-tf", False, _STORE_TRUE, "TF BatchNorm defaults are not supported; use --bn-momentum/--bn-eps"),
    "jsd": Refused("--jsd", False, _STORE_TRUE, "needs --aug-splits, which is not supported"),
}  # fmt: skip
UNSUPPORTED = REFUSED  # the earlier name


def mixup_active(args: argparse.Namespace) -> bool:
    """timm's rule: mixup/cutmix run when either alpha is > 0 or a cutmix box range is given."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# accepted at any value because they only matter with another flag (timm ignores them too);
# a non-default value while that flag is off gets one warning. dest -> (needs, is it on?)
INERT: dict[str, tuple[str, Callable[[argparse.Namespace], bool]]] = {
    **{k: ("--log-wandb", lambda a: a.log_wandb) for k in ("wandb_project", "wandb_tags", "wandb_resume_id")},
    "torchcompile_mode": ("--torchcompile", lambda a: a.torchcompile is not None),
    **{k: ("--kd-model-name", lambda a: a.kd_model_name is not None) for k in (
        "kd_distill_type", "kd_loss_type", "distill_loss_weight", "task_loss_weight", "kd_temperature",
        "kd_student_feature_dim", "kd_teacher_feature_dim", "kd_token_distill_type")},
    **{k: ("--naflex-loader", lambda a: a.naflex_loader) for k in (
        "naflex_train_seq_lens", "naflex_max_seq_len", "naflex_patch_sizes", "naflex_patch_size_probs",
        "naflex_loss_scale", "naflex_patchify_channels_first")},
    **{k: ("--train-img-sizes", lambda a: a.train_img_sizes is not None) for k in (
        "train_batch_sizes", "train_size_probs", "train_size_schedule", "train_size_schedule_spread",
        "train_size_random_mix", "variable_batch_loss_scale")},
    **{k: ("--mixup/--cutmix/--cutmix-minmax", mixup_active) for k in (
        "mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch")},
    **{k: ("--bce-loss", lambda a: a.bce_loss) for k in ("bce_sum", "bce_target_thresh", "bce_pos_weight")},
    **{k: ("--layer-decay", lambda a: a.layer_decay is not None) for k in (
        "layer_decay_min_scale", "layer_decay_no_opt_scale")},
    **{k: ("--reprob > 0", lambda a: a.reprob > 0) for k in ("remode", "recount", "resplit")},
    "color_jitter_prob": ("--color-jitter", lambda a: bool(a.color_jitter)),
}  # fmt: skip

# how the INERT keys whose flag is refused here are parsed (timm's types and defaults)
_INERT_FLAGS: dict[str, dict[str, Any]] = {
    "wandb_project": {"default": None},
    "wandb_tags": {"default": [], "nargs": "+"},
    "wandb_resume_id": {"default": ""},
    "torchcompile_mode": {"default": None},
    "kd_distill_type": {"default": "logit", "choices": ["logit", "feature", "token"]},
    "kd_loss_type": {"default": "kl"},
    "distill_loss_weight": {"default": None, "type": float},
    "task_loss_weight": {"default": None, "type": float},
    "kd_temperature": {"default": 4.0, "type": float},
    "kd_student_feature_dim": {"default": None, "type": int},
    "kd_teacher_feature_dim": {"default": None, "type": int},
    "kd_token_distill_type": {"default": "soft", "choices": ["soft", "hard"]},
    "naflex_train_seq_lens": {"default": [128, 256, 576, 784, 1024], "type": int, "nargs": "+"},
    "naflex_max_seq_len": {"default": 576, "type": int},
    "naflex_patch_sizes": {"default": None, "type": int, "nargs": "+"},
    "naflex_patch_size_probs": {"default": None, "type": float, "nargs": "+"},
    "naflex_loss_scale": {"default": "linear", "choices": ["none", "sqrt", "linear"]},
    "naflex_patchify_channels_first": {"default": False, "action": "store_true"},
    "train_batch_sizes": {"default": None, "type": int, "nargs": "+"},
    "train_size_probs": {"default": None, "type": float, "nargs": "+"},
    "train_size_schedule": {"default": "constant", "choices": ["constant", "progressive"]},
    "train_size_schedule_spread": {"default": 0.65, "type": float},
    "train_size_random_mix": {"default": 0.1, "type": float},
    "variable_batch_loss_scale": {"default": "none", "choices": ["none", "sqrt", "linear"]},
}

# timm flags that tune only timm machinery accelerate replaces: no effect on what is trained
NO_OPS: dict[str, str] = {
    "no_prefetcher": "timm's CUDA prefetcher is not used; batches are moved by accelerate",
    "local_rank": "accelerate / torchrun set the ranks",
    "synchronize_step": "a CUDA synchronize per step only changes timing",
    "use_multi_epochs_loader": "keeping workers alive across epochs only changes speed",
}

# YAML null accepted where timm's code accepts None for a key whose default is not None
# (a false boolean, timm's default range, the model's interpolation, "off"): dest -> value used
NULL_VALUES: dict[str, Any] = {
    "color_jitter": None,  # no colour jitter (timm: `if color_jitter is not None`)
    "scale": [0.08, 1.0],  # timm: `scale or (0.08, 1.0)`
    "ratio": [3.0 / 4.0, 4.0 / 3.0],
    "interpolation": "",  # the model's interpolation
    "train_interpolation": "",
    "smoothing": 0.0,  # timm: `elif args.smoothing:`
    "mixup_off_epoch": 0,
    "aug_repeats": 0.0,
    "dist_bn": "",  # timm: only 'broadcast'/'reduce' act
    "lr_base_scale": "",
    "class_map": "",
    "output": "",
    "experiment": "",
    "resume": "",
    "initial_checkpoint": "",
    "md_diagnosis": "",
    "md_masks": "",
    "wandb_tags": [],
    "wandb_resume_id": "",
    "fuser": "",
    "worker_seeding": "all",
    "amp_impl": "native",
}

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_TRAIN_INTERPOLATIONS = ("", "random", "bilinear", "bicubic", "nearest")


def create_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="train_md.py",
        description="timm-compatible training with Model Doctor diagnosis and treatment",
        null_values=NULL_VALUES,
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
    g.add_argument(
        "--validation-batch-size-multiplier",
        type=int,
        default=1,
        help="(older timm) validation batch = this x --batch-size when -vb is not given",
    )
    g.add_argument("--channels-last", action="store_true", default=False)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--grad-checkpointing", action="store_true", default=False)
    g.add_argument("--model-kwargs", nargs="*", default={}, action=KwargsAction)
    g.add_argument("--drop", type=float, default=0.0)
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
        "--head-init-scale", type=float, default=None, help="scale the classifier's initial weights"
    )
    g.add_argument(
        "--head-init-bias", type=float, default=None, help="set the classifier's initial bias"
    )
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)

    g = p.add_argument_group("Device and precision (accelerate)")
    g.add_argument(
        "--amp", action="store_true", default=False, help="mixed precision (see --amp-dtype)"
    )
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
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
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=KwargsAction)
    g.add_argument(
        "--layer-decay", type=float, default=None, help="layer-wise lr decay (timm optimizer)"
    )
    g.add_argument("--layer-decay-min-scale", type=float, default=0.0)
    g.add_argument("--layer-decay-no-opt-scale", type=float, default=None)

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
    g.add_argument("--lr-decay-fn", default=None, help="decay function of wsd/rsqrt (timm 1.0.31)")
    g.add_argument(
        "--lr-stable-timescale", type=float, default=None, help="rsqrt timescale (timm 1.0.31)"
    )

    g = p.add_argument_group("Augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument(
        "--train-crop-mode",
        default=None,
        choices=["rrc", "rkrc", "rkrr"],
        help="rrc: RandomResizedCrop (default); rkrc/rkrr: keep-ratio resize, centre/random crop",
    )
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4, help="strength; null in YAML: off")
    g.add_argument("--color-jitter-prob", type=float, default=None)
    g.add_argument("--grayscale-prob", type=float, default=None)
    g.add_argument("--gaussian-blur-prob", type=float, default=None)
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
    g.add_argument("--remode", default="pixel", choices=["const", "rand", "pixel"])
    g.add_argument("--recount", type=int, default=1, help="random erasing: at most this many boxes")
    g.add_argument(
        "--resplit",
        action="store_true",
        default=False,
        help="random erasing spares the first half of each batch (timm's clean split)",
    )
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (> 0 enables)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (> 0 enables)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--bce-loss", action="store_true", default=False, help="binary cross-entropy")
    g.add_argument("--bce-sum", action="store_true", default=False)
    g.add_argument("--bce-target-thresh", type=float, default=None)
    g.add_argument("--bce-pos-weight", type=float, default=None)
    g.add_argument(
        "--train-interpolation",
        default="random",
        help="random (bilinear or bicubic per image), bilinear, bicubic, nearest",
    )
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
    g.add_argument("--checkpoint-hist", type=int, default=10)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument(
        "--pin-mem", action="store_true", default=False, help="pinned memory in the DataLoaders"
    )
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

    g.add_argument(
        "--ignore-unknown-keys",
        action="store_true",
        default=False,
        help="config keys no timm version knows become one warning instead of an error",
    )

    g = p.add_argument_group("timm flags without effect on training here (accepted at any value)")
    g.add_argument(
        "--no-prefetcher", action="store_true", default=False, help=NO_OPS["no_prefetcher"]
    )
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help=NO_OPS["local_rank"])
    g.add_argument(
        "--synchronize-step", action="store_true", default=False, help=NO_OPS["synchronize_step"]
    )
    g.add_argument(
        "--use-multi-epochs-loader",
        action="store_true",
        default=False,
        help=NO_OPS["use_multi_epochs_loader"],
    )
    g.add_argument(
        "--worker-seeding",
        default="all",
        choices=["all"],
        help="torch seeds python, numpy and torch in each loader worker (timm's 'all')",
    )

    g = p.add_argument_group(
        "timm flags that act only with a flag refused here (accepted at any value, as timm does)"
    )
    for dest, kw in _INERT_FLAGS.items():
        needs = INERT[dest][0]
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, help=f"only with {needs}", **kw)

    g = p.add_argument_group("timm flags refused unless at their default (one error line)")
    for dest, r in REFUSED.items():
        kw = dict(r.kwargs)
        if dest == "pretrained_cfg_overlay":
            kw["action"] = KwargsAction
        g.add_argument(r.flag, dest=dest, default=r.default, help=f"{r.why}", **kw)  # fmt: skip
    return p


def _check_refused(args: argparse.Namespace) -> None:
    """All refused timm flags with a non-default value, in one error line."""
    bad = [
        f"{r.flag} ({r.why})"
        for dest, r in REFUSED.items()
        if getattr(args, dest) != r.default and not (r.default == {} and not getattr(args, dest))
    ]
    if bad:
        raise ConfigError(
            f"timm option{'s' if len(bad) > 1 else ''} not supported by train_md.py: "
            + "; ".join(bad)
        )


def _warn_inert(args: argparse.Namespace) -> None:
    """One warning naming the flags that have no effect because the flag they need is off."""
    defaults = {a.dest: a.default for a in create_parser()._actions}  # not the YAML's
    idle = [
        f"--{dest.replace('_', '-')} (needs {needs})"
        for dest, (needs, on) in INERT.items()
        if getattr(args, dest) != defaults[dest] and not on(args)
    ]
    if idle:
        warnings.warn("no effect, as in timm: " + ", ".join(idle), UserWarning, stacklevel=3)


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


def _validate(args: argparse.Namespace) -> None:
    _check_refused(args)
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: YAML defaults, then the command line."""
    parser = create_parser()
    apply_config(parser, argv, ignore_unknown_flag=True)
    argv = list(argv) if argv is not None else None
    args = parser.parse_args(argv)
    _validate(args)
    _warn_inert(args)
    return args
