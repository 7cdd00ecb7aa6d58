"""timm train.py's flags that train_md.py accepts only for compatibility, in tables.

Every key timm's ``train.py`` writes to ``args.yaml`` (0.5.x to 1.0.31 and HEAD) is a flag of
``train_md.py``, so a timm config loads unchanged. The keys that do not train anything here are
listed in these tables, each with the reason:

* ``NO_OPS``: accepted at any value, they only tune timm machinery that accelerate replaces;
* ``INERT``: accepted at any value, they act only together with another flag that is off (or
  refused here), as in timm, which ignores them too; a non-default value gets one warning;
* ``REFUSED``: refused in one line unless at their default value, because honouring them is not
  possible here (e.g. ``torch.compile`` breaks Model Doctor's double backward).

``NULL_VALUES`` says what a YAML ``null`` means where timm's code accepts ``None`` for a key whose
default is not ``None``. ``--help`` lists these flags only with ``--help-all``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..config import KwargsAction, Parser
from ..errors import ConfigError

__all__ = [
    "INERT",
    "INERT_FLAGS",
    "NO_OPS",
    "NULL_VALUES",
    "REFUSED",
    "UNSUPPORTED",
    "Refused",
    "add_timm_compat_flags",
    "check_refused",
    "is_hf_dataset",
    "mixup_active",
    "warn_inert",
]


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
    """timm's rule: mixup/cutmix run when either alpha is > 0 or a cutmix box range is given.

    Args:
        args: the parsed ``train_md.py`` namespace.

    Returns:
        Whether timm's Mixup would be built (soft targets).
    """
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def is_hf_dataset(name: str | None) -> bool:
    """A Hugging Face dataset name as timm spells it (``hfds/...`` or ``hfids/...``).

    Args:
        name: the ``--dataset`` value.

    Returns:
        Whether timm would read it through the Hugging Face ``datasets`` library.
    """
    return str(name or "").lower().startswith(("hfds/", "hfids/"))


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
    "dataset_trust_remote_code": ("a Hugging Face --dataset (hfds/..., hfids/...)", lambda a: is_hf_dataset(a.dataset)),
}  # fmt: skip

# how the INERT keys whose flag is refused here are parsed (timm's types and defaults)
INERT_FLAGS: dict[str, dict[str, Any]] = {
    "dataset_trust_remote_code": {"default": False, "action": "store_true"},
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


def add_timm_compat_flags(p: Parser) -> None:
    """The three groups of timm flags that train nothing here; ``--help`` hides them.

    Args:
        p: the ``train_md.py`` parser; the groups are hidden groups, listed by ``--help-all``.
    """
    g = p.add_argument_group(
        "timm flags without effect on training here (accepted at any value)", hidden=True
    )
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
        "timm flags that act only with a flag refused here (accepted at any value, as timm does)",
        hidden=True,
    )
    for dest, kw in INERT_FLAGS.items():
        needs = INERT[dest][0]
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, help=f"only with {needs}", **kw)
    g = p.add_argument_group(
        "timm flags refused unless at their default (one error line)", hidden=True
    )
    for dest, r in REFUSED.items():
        kw = dict(r.kwargs)
        if dest == "pretrained_cfg_overlay":
            kw["action"] = KwargsAction
        g.add_argument(r.flag, dest=dest, default=r.default, help=r.why, **kw)


def check_refused(args: argparse.Namespace) -> None:
    """All refused timm flags with a non-default value, in one error line.

    Args:
        args: the parsed namespace.

    Raises:
        ConfigError: naming every refused flag that is set, with the reason.
    """
    bad = [
        f"{r.flag} ({r.why})"
        for dest, r in REFUSED.items()
        if getattr(args, dest) != r.default and not (r.default == {} and not getattr(args, dest))
    ]
    if args.dataset_trust_remote_code and is_hf_dataset(args.dataset):  # it would act here
        bad.append("--dataset-trust-remote-code (Hugging Face datasets are not supported)")
    if bad:
        raise ConfigError(
            f"timm option{'s' if len(bad) > 1 else ''} not supported by train_md.py: "
            + "; ".join(bad)
        )


def warn_inert(args: argparse.Namespace, defaults: Mapping[str, Any]) -> None:
    """One warning naming the flags that have no effect because the flag they need is off.

    Args:
        args: the parsed namespace.
        defaults: the parser's own defaults (not the YAML's), dest -> value.
    """
    idle = [
        f"--{dest.replace('_', '-')} (needs {needs})"
        for dest, (needs, on) in INERT.items()
        if getattr(args, dest) != defaults[dest] and not on(args)
    ]
    if idle:
        warnings.warn("no effect, as in timm: " + ", ".join(idle), UserWarning, stacklevel=3)
