"""Where a ``train_md.py`` run computes: logging, the accelerator, the device and the launch.

:func:`create_context` is the first phase: it imports ``--device-modules``, creates the
``accelerate.Accelerator`` (mixed precision, gradient accumulation, DDP options), sets up logging
for the main process and seeds every RNG.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from ..errors import ConfigError
from .context import RunContext

__all__ = ["create_accelerator", "create_context", "check_launch", "select_device"]

_logger = logging.getLogger("train_md")


def setup_logging(is_main: bool) -> None:
    """Plain messages on stdout; only the main process logs below WARNING."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
        force=True,
    )


def select_device(args: argparse.Namespace) -> None:
    """``--device cuda:N`` in a single process: make GPU N current before accelerate starts
    (accelerate then uses ``cuda``, the current device). Several processes get one GPU per
    local rank from accelerate, so there the flag is refused."""
    dev = str(args.device or "")
    if dev == "cuda" and not torch.cuda.is_available():
        _logger.warning("--device cuda: no CUDA device here, accelerate trains on the CPU")
    if not dev.startswith("cuda:"):
        return
    index = int(dev.split(":", 1)[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"--device {dev} selects one GPU; with several processes use "
            "`accelerate launch --gpu_ids ...` (or CUDA_VISIBLE_DEVICES) instead"
        )
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(f"--device {dev}: this machine has {have} CUDA device(s)")
    torch.cuda.set_device(index)


def import_device_modules(args: argparse.Namespace) -> None:
    """timm's ``--device-modules``: import them first (they may register models or backends)."""
    for name in args.device_modules or []:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"--device-modules: cannot import {name!r}: {e}") from None


def _no_accelerator() -> bool:
    """True on a machine without a GPU (or another accelerator torch knows)."""
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6
    if probe is not None:
        return not probe.is_available()
    return not torch.cuda.is_available()


def check_launch(env: dict[str, str] | None = None) -> str | None:
    """The one-line advice when ``accelerate launch`` started fewer processes than asked.

    Without ``--multi_gpu``, ``accelerate launch --num_processes N`` uses its simple launcher:
    ONE process, which it gives ``MASTER_ADDR``/``MASTER_PORT`` (only when N > 1) but no rank or
    world size. Returns None when the launch is as asked.
    """
    env = os.environ if env is None else env
    launched = "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env
    ranked = any(k in env for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not launched or ranked:
        return None
    return (
        "accelerate launch started 1 process: without --multi_gpu it ignores --num_processes; "
        "for N processes run `accelerate launch --multi_gpu --num_processes N train_md.py ...` "
        "(on a machine without GPUs too: they then train on the CPU)"
    )


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's ``Accelerator``: ``--amp/--amp-dtype``, ``--grad-accum-steps``, ``--no-ddp-bb``.

    Several processes on a machine without GPUs (``accelerate launch --multi_gpu`` or torchrun
    there) train on the CPU over gloo: accelerate would otherwise start each process as a
    separate single-process run (two "main" processes writing one folder).
    """
    select_device(args)
    mixed = None
    if args.amp:
        mixed = "bf16" if args.amp_dtype == "bfloat16" else "fp16"
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=args.grad_accum_steps,
        cpu=(args.device == "cpu") or (several and _no_accelerator()),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=not args.no_ddp_bb)],
    )
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        warnings.warn(
            "fp16 autocast is not available on CPU: training runs in fp32; use --amp-dtype bfloat16",
            stacklevel=2,
        )
    return acc


def create_context(args: argparse.Namespace, nested: bool = False) -> RunContext:
    """Accelerator, logging and the seed: what every later phase runs under."""
    import_device_modules(args)
    acc = create_accelerator(args)
    setup_logging(acc.is_main_process)
    advice = check_launch()
    if advice and acc.is_main_process and not nested:
        _logger.warning("warning: %s", advice)
    set_seed(args.seed)
    return RunContext(args=args, acc=acc, nested=nested)
