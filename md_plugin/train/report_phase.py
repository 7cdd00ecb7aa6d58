"""Phase 7 of a run: best metric, before/after treatment, the report, the final test; the end.

The best epoch is logged 1-based, as the "Epoch N/M" lines count (``summary.csv`` and
``best_per_class.json`` keep timm's 0-based ``epoch``). With ``--val-from-train`` the checkpoint
selected on the held-out images is evaluated once on the test split (``test_results.json``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from torch.utils.data import DataLoader

from ..checkpoint import load_weights
from ..data.datasets import TransformedDataset
from ..rundir import advance_phase
from . import report_hook  # its report module (matplotlib) is imported only when a report is made
from .context import RunContext, atomic_text
from .engine import evaluate

__all__ = ["report"]

_logger = logging.getLogger("train_md")


def report(ctx: RunContext) -> dict[str, Any]:
    """Best metric, before/after treatment and the treatment report; ends the run."""
    args, saver = ctx.args, ctx.saver
    if ctx.is_main:
        advance_phase(ctx.out_dir, "report")
    if ctx.doctor is not None and ctx.before is not None and not ctx.eval_m:
        # resumed after the last epoch (e.g. the report was interrupted): evaluate the final
        # model again so the report can be rebuilt
        ctx.doctor.capture.enabled = False
        ctx.eval_m = evaluate(ctx.model, ctx.val_loader, ctx.acc, ctx.num_classes)
        ctx.doctor.capture.enabled = True
    eval_m = ctx.eval_m
    result = {
        "out_dir": str(ctx.out_dir),
        "top1": eval_m.get("top1"),
        "top5": eval_m.get("top5"),
        "per_class": eval_m.get("per_class"),
        "best": saver.best,
    }
    if ctx.is_main:
        _log_result(ctx)
        if ctx.doctor is not None and ctx.before is not None and eval_m and args.md_report:
            _write_report(ctx)
    if ctx.doctor is not None:
        ctx.doctor.remove()
    if ctx.test_base is not None:
        result["test"] = _final_test(ctx)
    if ctx.is_main:
        advance_phase(ctx.out_dir, "done")
    ctx.acc.wait_for_everyone()
    if not ctx.nested:
        ctx.acc.end_training()
    return result


def _log_result(ctx: RunContext) -> None:
    saver, eval_m = ctx.saver, ctx.eval_m
    if saver.best:
        _logger.info(
            "*** Best metric: %.4f (epoch %d); final-epoch top1 %.2f%s",
            saver.best[0],
            saver.best[1] + 1,
            eval_m.get("top1", float("nan")),
            ""
            if not ctx.val_is_test
            else " (the validation split is the test set: report the final epoch)",
        )
    if ctx.doctor is not None and ctx.before is not None and eval_m:
        _logger.info(
            "Model Doctor: top1 before treatment %.2f -> after %.2f",
            ctx.before["top1"],
            eval_m["top1"],
        )


def _final_test(ctx: RunContext) -> dict[str, Any]:
    """With --val-from-train: evaluate the held-out-selected best checkpoint on the test set once.

    Writes ``test_results.json`` (which checkpoint, which epoch, top-1/top-5, per class); the
    summary's ``eval_*`` columns are the held-out validation set, not the test set.
    """
    args, acc, saver = ctx.args, ctx.acc, ctx.saver
    best_path = ctx.out_dir / "model_best.pth.tar"
    which, epoch = "last", None
    if saver.best is not None and best_path.is_file():
        load_weights(ctx.unwrapped, best_path, prefer_ema=bool(args.model_ema))
        which, epoch = "model_best", int(saver.best[1])
    loader = DataLoader(
        TransformedDataset(ctx.test_base, ctx.eval_tf),
        batch_size=args.validation_batch_size or args.batch_size,
        shuffle=False,
        num_workers=args.workers,
    )
    m = evaluate(ctx.model, acc.prepare(loader), acc, ctx.num_classes)  # model wraps unwrapped
    out = {
        "checkpoint": which,
        "epoch": epoch,
        "selected_on": f"{args.val_from_train} images held out from {args.train_split!r}",
        "test_split": args.val_split,
        "images": m["count"],
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
        "classes": ctx.class_names,
        "per_class": m["per_class"],
    }
    if acc.is_main_process:
        atomic_text(ctx.out_dir / "test_results.json", json.dumps(out, indent=1))
        _logger.info(
            "*** TEST (split %r, %d images, read once): top1 %.2f top5 %.2f with %s%s "
            "(selected on the held-out validation images) -> test_results.json",
            args.val_split, m["count"], m["top1"], m["top5"], which,
            f" (epoch {epoch + 1})" if epoch is not None else "",
        )  # fmt: skip
    return out


def _write_report(ctx: RunContext) -> None:
    try:
        path = report_hook.write_treatment_report(
            ctx.out_dir / "report",
            ctx.doctor,
            ctx.unwrapped,
            ctx.before,
            ctx.eval_m,
            ctx.class_names,
            ctx.train_base,
            ctx.eval_tf,
            ctx.args,
        )
        _logger.info("report: %s", path)
    except Exception as e:  # a figure must never cost the user a finished training run
        _logger.warning("could not write the report: %s", e)
