"""The trainer's model: ``timm.create_model`` with timm ``train.py``'s model flags.

Registers this package's models (CIFAR ResNets, SimCNN) by importing :mod:`md_plugin.models`,
loads ``--initial-checkpoint`` (:func:`check_initial_checkpoint` refuses a non-finite one before
any work), applies ``--head-init-*`` and ``--grad-checkpointing``, and passes
``--img-size``/``--input-size`` to a model built for one input size (timm's
``fixed_input_size``, e.g. a ViT), which would otherwise end in timm's "Input height doesn't
match model" assertion.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg

from .. import models  # noqa: F401  (registers the CIFAR ResNets and SimCNN with timm)
from ..checkpoint import load_checkpoint_file, load_weights, non_finite_tensors, state_dict_of
from ..errors import ConfigError

__all__ = ["check_initial_checkpoint", "create_md_model", "requested_img_size"]

_logger = logging.getLogger("train_md")


def requested_img_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """(height, width) asked for by ``--input-size`` or ``--img-size``, or None."""
    if args.input_size:
        return int(args.input_size[-2]), int(args.input_size[-1])
    if args.img_size:
        return int(args.img_size), int(args.img_size)
    return None


def _fixed_size_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``img_size`` for a model whose input size is fixed at construction, when the run asks for
    another size and ``--model-kwargs`` does not already decide it (``img_size`` given, or
    ``dynamic_img_size``, which makes the model accept any size)."""
    size = requested_img_size(args)
    if size is None or {"img_size", "dynamic_img_size"} & set(args.model_kwargs):
        return {}
    try:
        cfg = get_pretrained_cfg(args.model)
    except RuntimeError:  # an unknown pretrained tag: timm.create_model names it
        return {}
    if cfg is None or not cfg.fixed_input_size or tuple(cfg.input_size[-2:]) == size:
        return {}
    _logger.info(
        "%s is built for %dx%d inputs: creating it with img_size=%s for --img-size/--input-size",
        args.model, cfg.input_size[-2], cfg.input_size[-1], size[0] if size[0] == size[1] else size,
    )  # fmt: skip
    return {"img_size": size[0] if size[0] == size[1] else size}


def check_initial_checkpoint(args: argparse.Namespace) -> None:
    """Refuse an ``--initial-checkpoint`` whose weights hold NaN/inf, before any work.

    A diverged checkpoint would otherwise be diagnosed (a diagnosis of noise, saved) and then
    fail in training with a message that blames the learning rate. One line names the tensor.
    """
    if not args.initial_checkpoint:
        return
    bad = non_finite_tensors(state_dict_of(load_checkpoint_file(args.initial_checkpoint)))
    if bad:
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise ConfigError(
            f"--initial-checkpoint {args.initial_checkpoint} holds NaN/inf in {bad[0]}{more}: a "
            "diverged model cannot be diagnosed or trained; start from an earlier checkpoint"
        )


def create_md_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The model of the run, with its initial weights loaded and timm's model flags applied."""
    kwargs: dict[str, Any] = dict(
        pretrained=args.pretrained,
        num_classes=num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        in_chans=args.in_chans,
    )
    if args.pretrained_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not timm.is_model(args.model):
        near = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        raise ConfigError(
            f"unknown model {args.model!r}" + (f"; similar: {', '.join(near)}" if near else "")
        )
    kwargs.update(_fixed_size_kwargs(args))
    try:
        model = timm.create_model(args.model, **kwargs, **args.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"cannot create {args.model}: {e}") from None
    except RuntimeError as e:
        raise ConfigError(f"cannot create {args.model}: {str(e).splitlines()[0]}") from None
    if args.initial_checkpoint:
        load_weights(model, args.initial_checkpoint)
    _init_head(model, args)
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(
                f"--grad-checkpointing: {args.model} does not support gradient checkpointing "
                "(it has no set_grad_checkpointing); drop the flag"
            )
        model.set_grad_checkpointing(True)
    return model


def _init_head(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """timm's ``--head-init-scale`` / ``--head-init-bias`` on the classifier (after loading)."""
    if args.head_init_scale is None and args.head_init_bias is None:
        return
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear | torch.nn.Conv2d):
        raise ConfigError(
            f"--head-init-scale/--head-init-bias: {args.model} has no linear classifier to scale"
        )
    with torch.no_grad():
        if args.head_init_scale is not None:
            head.weight.mul_(args.head_init_scale)
            if head.bias is not None:
                head.bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None and head.bias is not None:
            head.bias.fill_(args.head_init_bias)
