"""What the ``md-doctor`` front ends share: model/data flags, the model and loader builders, outputs.

``md-doctor diagnose|sift-low|report`` (:mod:`md_plugin.cli`), ``md-doctor split``
(:mod:`md_plugin.splitter.cli`) and ``md-doctor patch`` (:mod:`md_plugin.splitter.patch_cli`) all
load a timm model from a checkpoint and run it, in eval mode, over a dataset with the eval
transform. Their flags carry ``train_md.py``'s names and are declared here once, as are the
builders behind them and the check that an output can be written before any work starts (a
read-only folder is one line up front, not a traceback after an hour's search).

This is a base module beside :mod:`md_plugin.config`: it imports nothing from
:mod:`md_plugin.train` or :mod:`md_plugin.splitter`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from timm.data import resolve_data_config
from torch.utils.data import DataLoader, Dataset

from . import models  # noqa: F401  (registers the CIFAR nets with timm)
from .config import KwargsAction
from .data.datasets import TransformedDataset
from .errors import ConfigError

__all__ = [
    "add_dataset_flags",
    "add_loader_flags",
    "add_model_flags",
    "check_loader_args",
    "check_writable_dir",
    "check_writable_file",
    "create_eval_loader",
    "create_model",
    "eval_data_config",
]

_Group = argparse._ArgumentGroup

DATASET_HELP = "as in train_md.py: torch/cifar10, cifar10_lt, sklearn/digits, '' (a folder), ..."


def add_model_flags(g: _Group, *, required: bool, what: str = "the trained model") -> None:
    """``--model --checkpoint --num-classes --model-kwargs`` (train_md.py's names).

    Args:
        g: the argument group to fill.
        required: argparse enforces ``--model``/``--checkpoint``; a config-driven command
            (whose YAML may give them) passes False and checks them after the parse.
        what: how the help names the model.
    """
    empty: dict[str, Any] = {} if required else {"default": ""}
    g.add_argument(
        "--model", required=required, **empty, help=f"timm name of {what}, e.g. resnet32_cifar"
    )
    g.add_argument(
        "--checkpoint", required=required, **empty,
        help=f"weights of {what} (.pth.tar or .safetensors)",
    )  # fmt: skip
    g.add_argument(
        "--num-classes", type=int, default=None,
        help="the model's outputs (default: the training split's classes)",
    )  # fmt: skip
    g.add_argument(
        "--model-kwargs", nargs="*", default={}, action=KwargsAction, metavar="K=V",
        help="extra keyword arguments of timm.create_model, as in train_md.py",
    )  # fmt: skip


def add_dataset_flags(g: _Group, *, default: str = "") -> None:
    """``--dataset --data-dir``.

    Args:
        g: the argument group to fill.
        default: the ``--dataset`` default of this command.
    """
    g.add_argument("--dataset", default=default, help=DATASET_HELP)
    g.add_argument("--data-dir", default=None, help="dataset root folder")


def add_loader_flags(g: _Group, *, batch_size: int) -> None:
    """``--input-size -b/--batch-size -j/--workers`` of the evaluation loader.

    Args:
        g: the argument group to fill.
        batch_size: the ``--batch-size`` default of this command.
    """
    g.add_argument(
        "--input-size", type=int, nargs=3, default=None, metavar="N",
        help="C H W of the input (default: the model's)",
    )  # fmt: skip
    g.add_argument("-b", "--batch-size", type=int, default=batch_size, help="evaluation batch size")
    g.add_argument("-j", "--workers", type=int, default=0, help="data loader processes")


def check_loader_args(args: argparse.Namespace) -> None:
    """Refuse a batch size below 1 or a negative worker count, before any data is read.

    Args:
        args: a namespace with ``batch_size`` and ``workers``.

    Raises:
        ConfigError: one line naming the flag.
    """
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")


def create_model(
    name: str, num_classes: int, model_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A timm model (the project's CIFAR nets included), built for evaluation of a checkpoint.

    Args:
        name: timm model name.
        num_classes: classifier outputs.
        model_kwargs: extra keyword arguments of ``timm.create_model``.

    Returns:
        The model with its initial weights (load the checkpoint next).

    Raises:
        ConfigError: an unknown model name, or keyword arguments the model does not take.
    """
    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}")
    try:
        return timm.create_model(name, num_classes=num_classes, **(model_kwargs or {}))
    except TypeError as e:
        raise ConfigError(f"cannot create {name}: {e}") from None
    except RuntimeError as e:
        raise ConfigError(f"cannot create {name}: {str(e).splitlines()[0]}") from None


def eval_data_config(model: nn.Module, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """timm's data config of ``model`` (input size, mean, std, crop, interpolation).

    Args:
        model: the model whose ``pretrained_cfg`` gives the defaults.
        input_size: ``--input-size`` (C, H, W), overriding the model's.

    Returns:
        The dict :func:`md_plugin.data.transforms.create_eval_transform` takes.
    """
    cfg = {"input_size": tuple(input_size)} if input_size else {}
    return resolve_data_config(cfg, model=model)


def create_eval_loader(
    dataset: Dataset, transform: Any, batch_size: int, workers: int = 0
) -> DataLoader:
    """The evaluation loader: ``transform`` applied, fixed order, no shuffling.

    Args:
        dataset: the untransformed dataset.
        transform: the eval transform.
        batch_size: images per batch.
        workers: loader processes.

    Returns:
        A loader of ``(images, labels)``.
    """
    return DataLoader(
        TransformedDataset(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
    )


def check_writable_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file that cannot be written, before any work is done.

    The file itself is written later, atomically (:mod:`md_plugin.files`); this only makes a
    read-only or missing-permission folder one line up front instead of after the work.

    Args:
        path: the output file.
        flag: the flag that named it, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: ``path`` is a folder, or its nearest existing folder is a file or not
            writable.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give a file name")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {parent} is not writable")
    return path


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Refuse an output folder that cannot be made or written, before any work is done.

    Args:
        path: the output folder (it may not exist yet).
        flag: the flag that named it, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: ``path`` (or a parent) is a file, or the nearest existing folder is not
            writable.
    """
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the folder {existing} is not writable")
    return path
