"""Phase 5 of a run (``--md``): diagnose the model, then attach the treatment losses.

The diagnosis comes from ``--md-diagnosis`` (fitted to this run's model and options), from the
run folder's ``diagnosis.safetensors`` when the run continues, or from diagnosing the model now.
A saved diagnosis carries the hash of the weights it was made from: a run that starts over
from a changed checkpoint (e.g. one mended in place) diagnoses again instead of reusing a
diagnosis of other weights. A signal during this phase stops the run with the resume line.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from torch.utils.data import DataLoader

from .. import doctor
from ..checkpoint import weights_hash
from ..data.class_map import apply_class_map
from ..data.datasets import TransformedDataset, create_dataset
from ..doctor import Diagnosis
from ..doctor.diagnosis import model_fingerprint, shard_dataset
from ..doctor.treatment import ModelDoctor, check_wrapped_model
from ..errors import ConfigError, MDError
from ..layers import resolve_layers
from ..rundir import advance_phase
from .context import RunContext
from .engine import evaluate
from .signals import stop_at_once
from .tables import format_diagnosis_table

__all__ = ["diagnose"]

_logger = logging.getLogger("train_md")


def diagnose(ctx: RunContext) -> None:
    """Model Doctor (``--md``): diagnose (or load a diagnosis), then attach the treatment losses.

    Sets ``ctx.doctor`` and, unless a resumed checkpoint carried them, ``ctx.before`` (the
    metrics before treatment).
    """
    args = ctx.args
    if not args.md:
        return
    # a saved diagnosis does not make a random model trained: the check holds with it too
    if not (args.initial_checkpoint or args.pretrained or args.resume):
        raise ConfigError(
            "Model Doctor treats a trained model: pass --initial-checkpoint (or --md-baseline-epochs N "
            "to train one first)"
        )
    if ctx.is_main:
        advance_phase(ctx.out_dir, "diagnosis")
    with stop_at_once("diagnosis", ctx.out_dir, ctx.nested):  # nothing to save midway
        diag = _diagnosis(ctx)
        if ctx.is_main:
            _logger.info(
                "diagnosis (%s):\n%s",
                args.md_diagnosis or ctx.out_dir / "diagnosis.safetensors",
                format_diagnosis_table(diag, ctx.class_names),
            )
        check_wrapped_model(ctx.model)
        ctx.doctor = ModelDoctor(
            ctx.unwrapped, diag, alpha=args.md_alpha, beta=args.md_beta, grad_mode=args.md_grad_mode,
            true_term=not args.md_no_true_term, confusing_term=not args.md_no_confusing_term,
            loss_kind=args.md_loss, monitor=args.md_monitor, num_classes=ctx.num_classes,
            input_size=ctx.data_config["input_size"], every=args.md_every,
        )  # fmt: skip
        if ctx.before is None and args.md_eval_before:
            ctx.before = _evaluate_before(ctx)


def _diagnosis(ctx: RunContext) -> Diagnosis:
    """The diagnosis to treat with: given, kept from this run, or made now (and saved)."""
    args = ctx.args
    if args.md_diagnosis:
        return _fit_diagnosis(ctx, Diagnosis.load(args.md_diagnosis), args.md_diagnosis)
    saved = ctx.out_dir / "diagnosis.safetensors"
    continuing = ctx.phase_at_start in ("training", "report")
    if (args.resume or continuing) and saved.exists():
        diag = Diagnosis.load(saved)
        # resumed: the run's own diagnosis, of the weights its treatment started from; starting
        # over: only a diagnosis of exactly these weights (the checkpoint may have changed)
        if args.resume or diag.fingerprint.get("weights") == weights_hash(ctx.unwrapped):
            return diag
        if ctx.is_main:
            _logger.info(
                "%s was made from other weights than this run starts from (a changed "
                "checkpoint?): diagnosing again",
                saved,
            )
    diag = _run_diagnosis(ctx)  # records the weights' hash in its fingerprint
    if ctx.is_main:
        diag.save(saved)
    return diag


def _diagnosis_split(ctx: RunContext) -> Any:
    """The images to diagnose on: the training split (less any hold-out) unless
    ``--md-diagnosis-split`` names another; the validation split only when forced."""
    args = ctx.args
    split = args.md_diagnosis_split or args.train_split
    if split == args.val_split or split.lower() in ("validation", "val", "test", "eval"):
        if not args.md_allow_val_diagnosis:
            raise ConfigError(
                f"refusing to diagnose on the validation split {split!r} (it leaks the evaluation "
                "set into training); pass --md-allow-val-diagnosis to force it"
            )
        warnings.warn(
            f"diagnosing on {split!r}: the evaluation set leaks into training", stacklevel=2
        )
    if args.val_from_train and split != args.train_split:
        raise ConfigError(
            f"--md-diagnosis-split {split!r} with --val-from-train: another split can hold the "
            "held-out images (e.g. 'training' is the whole CIFAR training set); the diagnosis "
            f"uses the training images left after the hold-out (--train-split {args.train_split!r})"
        )
    if split == args.train_split:
        return ctx.train_base  # without the --val-from-train hold-out
    base = create_dataset(
        args.dataset, args.data_dir, split,
        imb_ratio=args.imb_ratio, imb_type=args.imb_type, imb_seed=args.imb_seed,
    )  # fmt: skip
    if args.class_map:
        base = apply_class_map(base, args.class_map, args.data_dir)
    return base


def _run_diagnosis(ctx: RunContext) -> Diagnosis:
    """Diagnose the model now, each image on exactly one rank."""
    args, acc = ctx.args, ctx.acc
    # a prepared loader would pad with repeated images, which could then enter a class's top-N
    # twice: shard by hand instead
    diag_loader = DataLoader(
        shard_dataset(
            TransformedDataset(_diagnosis_split(ctx), ctx.eval_tf),
            acc.num_processes,
            acc.process_index,
        ),
        batch_size=args.validation_batch_size or args.batch_size,
        shuffle=False,
        num_workers=args.workers,
    )
    return doctor.diagnose(
        ctx.unwrapped, diag_loader, args.md_layers, ctx.num_classes, per_class=args.md_per_class,
        min_confidence=args.md_min_confidence, grad_mode=args.md_grad_mode,
        gate_activation=args.md_gate_activation, mask_rule=args.md_mask_rule, theta=args.md_theta,
        topk=args.md_topk, accelerator=acc, progress=acc.is_main_process and not args.no_progress and sys.stderr.isatty(),
        input_size=ctx.data_config["input_size"],
    )  # fmt: skip


def _evaluate_before(ctx: RunContext) -> dict[str, Any]:
    """Accuracy before treatment (the capture hooks off: a plain evaluation)."""
    ctx.doctor.capture.enabled = False
    ev = evaluate(ctx.model, ctx.val_loader, ctx.acc, ctx.num_classes)
    ctx.doctor.capture.enabled = True
    if ctx.is_main:
        _logger.info("before treatment: top1 %.2f top5 %.2f", ev["top1"], ev["top5"])
    return {
        "top1": ev["top1"],
        "top5": ev["top5"],
        "per_class": ev["per_class"],
        "confusion": ev["confusion"].tolist(),
    }


def _fit_diagnosis(ctx: RunContext, diag: Diagnosis, path: str) -> Diagnosis:
    """A ``--md-diagnosis`` file made to match this run's model, layers and mask options.

    Another architecture is named as such; ``--md-layers`` must be among the diagnosis' layers
    (only those are used); the run's mask rule/theta/topk are applied to the saved scores. A
    mismatch is either applied (and logged) or an error, never silently dropped.
    """
    args, model = ctx.args, ctx.unwrapped
    mine = model_fingerprint(model, [])
    if diag.fingerprint.get("params") != mine["params"]:
        raise MDError(
            "diagnosis was made for a model with different parameter shapes "
            f"({diag.fingerprint.get('arch')!r}, this model is {mine['arch']!r}): {path}"
        )
    names = [r.name for r in resolve_layers(model, args.md_layers, ctx.data_config["input_size"])]
    missing = [n for n in names if n not in diag.layers]
    if missing:
        raise ConfigError(
            f"--md-layers {args.md_layers!r} is {', '.join(names)}, but the diagnosis {path} "
            f"covers {', '.join(diag.layer_names)}: pass --md-layers {','.join(diag.layer_names)} "
            "or diagnose again"
        )
    if names != diag.layer_names:
        fp = dict(
            diag.fingerprint, layers={n: diag.fingerprint.get("layers", {}).get(n) for n in names}
        )
        diag = Diagnosis({n: diag.layers[n] for n in names}, diag.counts, fp, diag.options)
    opts = diag.options
    want = (args.md_mask_rule, args.md_theta, args.md_topk)
    if (opts.get("mask_rule"), opts.get("theta"), opts.get("topk")) != want:
        diag = diag.remask(*want)
        if ctx.is_main:
            _logger.info(
                "diagnosis %s: masks recomputed from its scores with --md-mask-rule %s "
                "(theta %s, topk %s; the file used %s/%s/%s)",
                path, *want, opts.get("mask_rule"), opts.get("theta"), opts.get("topk"),
            )  # fmt: skip
    return diag
