"""``md-doctor``: diagnosis and annotation tools outside training.

    md-doctor diagnose --model resnet32_cifar --checkpoint last.pth.tar --dataset torch/cifar10 --data-dir DATA
    md-doctor sift-low ... --out workspace/        # images worth annotating, opens in `labelme workspace/`
    md-doctor masks --annotations workspace/ --out masks/
    md-doctor report --diagnosis diagnosis.safetensors --checkpoint last.pth.tar --out report/
    md-doctor split -c split.yaml                    # CNNSplitter: per-class modules of a model
    md-doctor patch -c patch.yaml                    # CNNSplitter: patch a weak model's class

User errors print one line and exit 2. Outputs are written like ``train_md.py`` writes: every
file atomically (:mod:`md_plugin.files`), an output that cannot be written is refused before any
work, and a folder that a command fills (``masks --out``, the ``split`` run folder) is locked
(:mod:`md_plugin.rundir`), so a second command on it is refused instead of racing the first.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
import warnings
from pathlib import Path

from .annotate import labelme_to_masks, write_workspace
from .checkpoint import load_weights
from .cli_common import (
    add_dataset_flags,
    add_loader_flags,
    add_model_flags,
    check_loader_args,
    check_writable_dir,
    check_writable_file,
    create_eval_loader,
    create_model,
    eval_data_config,
)
from .config import Parser
from .data.datasets import create_dataset, get_class_names, get_targets
from .data.transforms import create_eval_transform
from .doctor import Diagnosis, diagnose
from .doctor.masks import check_mask_options
from .doctor.sift_low import sift_low_confidence
from .errors import ConfigError, MDError, format_warning
from .rundir import LOCK_NAME, RunDirLock, prepare_run_dir
from .splitter.cli import cmd_split as run_split
from .splitter.cli import parse_split_args
from .splitter.patch_cli import main as patch_main
from .train.tables import format_diagnosis_table

__all__ = ["main", "create_parser"]


def _add_model_data(p: argparse.ArgumentParser, split: str = "train") -> None:
    g = p.add_argument_group("model and data (timm / train_md.py flag names)")
    add_model_flags(g, required=True)
    add_dataset_flags(g)
    g.add_argument("--split", default=split, help="the dataset split to run on")
    g.add_argument(
        "--imb-ratio", type=float, default=100.0, help="long-tailed CIFAR: n_max / n_min"
    )
    g.add_argument("--imb-type", default="exp", help="long-tailed CIFAR: exp or step profile")
    g.add_argument("--imb-seed", type=int, default=0, help="long-tailed CIFAR: subset seed")
    add_loader_flags(g, batch_size=128)


def _add_diagnose(sub) -> None:
    d = sub.add_parser("diagnose", help="diagnose a trained model and save diagnosis.safetensors")
    _add_model_data(d)
    d.add_argument(
        "--layers", default="last_conv", help="layer specs, as train_md.py's --md-layers"
    )
    d.add_argument(
        "--per-class", type=int, default=50, help="high-confidence images per class to diagnose"
    )
    d.add_argument(
        "--min-confidence", type=float, default=0.0,
        help="use only images whose true-class probability is at least this",
    )  # fmt: skip
    d.add_argument(
        "--grad-mode", default="relu", choices=["relu", "abs"],
        help="channel score: positive part or magnitude of the true-class gradient",
    )  # fmt: skip
    d.add_argument(
        "--gate-activation", action="store_true",
        help="score a channel only where its activation is positive",
    )  # fmt: skip
    d.add_argument(
        "--mask-rule", default="theta", choices=["theta", "mean", "topk"],
        help="relevant channels: normalised score > --theta, >= the class mean, or the top k",
    )  # fmt: skip
    d.add_argument("--theta", type=float, default=0.2, help="threshold of --mask-rule theta")
    d.add_argument("--topk", type=int, default=None, help="k of --mask-rule topk")
    d.add_argument(
        "--allow-val", action="store_true", help="permit a non-training split (leaks it)"
    )
    d.add_argument("--out", default="diagnosis.safetensors", help="the diagnosis file to write")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _add_sift_low(sub) -> None:
    s = sub.add_parser(
        "sift-low", help="write an annotation workspace of low-confidence training images"
    )
    _add_model_data(s)
    s.add_argument("--per-class", type=int, default=20, help="images per class to pick")
    s.add_argument("--low", type=float, default=0.6, help="lowest true-class confidence kept")
    s.add_argument("--high", type=float, default=0.8, help="true-class confidence kept below this")
    s.add_argument(
        "--misclassified-first",
        action="store_true",
        help="official ordering: confidently wrong images first",
    )
    s.add_argument("--size", type=int, default=128, help="PNG size for annotation")
    s.add_argument("--out", required=True, help="the workspace folder to write")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty workspace")


def _add_masks(sub) -> None:
    m = sub.add_parser("masks", help="convert labelme annotations to foreground masks")
    m.add_argument(
        "--annotations", required=True, help="the workspace folder with labelme JSON files"
    )
    m.add_argument("--out", required=True, help="the mask folder to write (locked while written)")
    m.add_argument("--dataset-size", type=int, default=None, help="reject indices >= this")
    m.add_argument(
        "--labels",
        nargs="*",
        default=None,
        help="only shapes with these labels count as foreground (default: all)",
    )
    m.add_argument("--overwrite", action="store_true", help="replace masks that exist")


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="figures + report.html for a diagnosis (and treatment)")
    r.add_argument("--diagnosis", required=True, help="the diagnosis file")
    _add_model_data(r, split="validation")
    r.add_argument(
        "--before-checkpoint",
        default="",
        help="the model before treatment, for before/after figures",
    )
    r.add_argument("--train-split", default="train", help="images for the gradient overlays")
    r.add_argument("--out", required=True, help="the report folder to write")


def create_parser() -> argparse.ArgumentParser:
    """The ``md-doctor`` parser: one subcommand per tool (``split``/``patch`` parse their own).

    Returns:
        A :class:`~md_plugin.config.Parser`: errors are one line, ``--help`` of every
        subcommand shows each flag's default.
    """
    p = Parser(prog="md-doctor", description="Model Doctor tools")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_diagnose(sub)
    _add_sift_low(sub)
    _add_masks(sub)
    sp = sub.add_parser(
        "split",
        add_help=False,
        help="split a strong CNN into per-class modules (CNNSplitter; md-doctor split -h)",
    )
    sp.set_defaults(split_args=[])  # everything after `split` goes to its own parser
    pt = sub.add_parser(
        "patch",
        add_help=False,
        help="patch a weak model's target class with a CNNSplitter module (md-doctor patch -h)",
    )
    pt.set_defaults(patch_args=[])  # everything after `patch` goes to its own parser
    _add_report(sub)
    return p


def _setup(args: argparse.Namespace, split: str | None = None):
    """Model with weights, the untransformed dataset of ``split`` and the eval transform."""
    check_loader_args(args)
    split = split or args.split
    size = args.input_size[-1] if args.input_size else 32
    ds = create_dataset(
        args.dataset, args.data_dir, split, imb_ratio=args.imb_ratio, imb_type=args.imb_type,
        imb_seed=args.imb_seed, input_size=size,
    )  # fmt: skip
    num_classes = args.num_classes or max(get_targets(ds)) + 1
    model = create_model(args.model, num_classes, args.model_kwargs)
    load_weights(model, args.checkpoint)
    data_config = eval_data_config(model, args.input_size)
    return model, ds, create_eval_transform(data_config), num_classes, data_config


def _loader(ds, transform, args: argparse.Namespace):
    return create_eval_loader(ds, transform, args.batch_size, args.workers)


def _guard_out(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise MDError(f"{path} exists; pass --overwrite to replace it")


def cmd_diagnose(args: argparse.Namespace) -> None:
    """``md-doctor diagnose``: every option and the output checked, then the diagnosis pass.

    Args:
        args: the parsed ``diagnose`` namespace.
    """
    check_mask_options(args.mask_rule, args.theta, args.topk)
    if args.per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {args.per_class}")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    check_loader_args(args)
    if args.split.lower() not in ("train", "training") and not args.allow_val:
        raise ConfigError(
            f"refusing to diagnose on split {args.split!r}: diagnosis must use training images "
            "(pass --allow-val to force it)"
        )
    out = Path(args.out)
    _guard_out(out, args.overwrite)
    check_writable_file(out, "--out")  # a read-only folder: one line now, not after the pass
    model, ds, tf, k, data_config = _setup(args)
    diag = diagnose(
        model, _loader(ds, tf, args), args.layers, k, per_class=args.per_class,
        min_confidence=args.min_confidence, grad_mode=args.grad_mode,
        gate_activation=args.gate_activation, mask_rule=args.mask_rule, theta=args.theta,
        topk=args.topk, progress=sys.stderr.isatty(), input_size=data_config["input_size"],
    )  # fmt: skip
    diag.save(out)  # atomic: a failed write leaves no file
    print(format_diagnosis_table(diag, get_class_names(ds, k)))
    print(f"saved {out}")


def cmd_sift_low(args: argparse.Namespace) -> None:
    """``md-doctor sift-low``: an annotation workspace of low-confidence training images.

    Args:
        args: the parsed ``sift-low`` namespace.
    """
    check_writable_dir(args.out, "--out")
    model, ds, tf, k, _ = _setup(args)
    records = sift_low_confidence(
        model, _loader(ds, tf, args), k, per_class=args.per_class, low=args.low, high=args.high,
        misclassified_first=args.misclassified_first,
        device=next(model.parameters()).device,
    )  # fmt: skip
    if not records:
        raise MDError(f"no training image has a true-class confidence in [{args.low}, {args.high})")
    out = write_workspace(
        args.out, records, ds, get_class_names(ds, k), size=args.size, overwrite=args.overwrite
    )
    print(f"{len(records)} images written to {out}; annotate with: labelme {out}")


def cmd_masks(args: argparse.Namespace) -> None:
    """``md-doctor masks``: labelme JSON -> mask PNGs, in a locked ``--out`` folder.

    Args:
        args: the parsed ``masks`` namespace.
    """
    out = check_writable_dir(args.out, "--out")
    ann = Path(args.annotations).expanduser()
    if not ann.is_dir():  # checked before --out is made
        raise MDError(f"annotation folder not found: {ann}")
    if out.resolve() == ann.resolve():
        raise ConfigError("--out is the annotation folder: write the masks to another folder")
    created = not out.exists()
    prepare_run_dir(out)
    with RunDirLock(out):  # two conversions into one folder: the second is refused
        try:
            report = labelme_to_masks(
                ann, out, dataset_size=args.dataset_size, overwrite=args.overwrite,
                foreground_labels=args.labels,
            )  # fmt: skip
        except BaseException:
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:
                shutil.rmtree(out, ignore_errors=True)  # nothing was written: leave no folder
            raise
    print(report.summary())
    if not report.written and report.skipped:
        raise MDError("no mask was written")


def cmd_report(args: argparse.Namespace) -> None:
    """``md-doctor report``: figures and report.html for a diagnosis (and a treatment).

    Args:
        args: the parsed ``report`` namespace.
    """
    # only this command needs accelerate, the trainer's evaluation and matplotlib: imported
    # here, so the other commands (and --help) start without them
    import torch
    from accelerate import Accelerator

    from .train.engine import evaluate
    from .train.report_hook import build_report

    check_writable_dir(args.out, "--out")
    diag = Diagnosis.load(args.diagnosis)
    model, val_ds, tf, k, _ = _setup(args)
    before_model = None
    if args.before_checkpoint:
        before_model = copy.deepcopy(model)
        load_weights(before_model, args.before_checkpoint)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    loader = acc.prepare(_loader(val_ds, tf, args))
    after = evaluate(acc.prepare(model), loader, acc, k)
    before = (
        evaluate(acc.prepare(before_model), loader, acc, k) if before_model is not None else None
    )
    train_ds = create_dataset(
        args.dataset, args.data_dir, args.train_split, imb_ratio=args.imb_ratio,
        imb_type=args.imb_type, imb_seed=args.imb_seed,
    )  # fmt: skip
    rows = [
        {
            "": "top-1 (%)",
            "after": round(after["top1"], 2),
            **({"before": round(before["top1"], 2)} if before else {}),
        }
    ]
    path = build_report(
        args.out, diag, get_class_names(val_ds, k), model_after=model, model_before=before_model,
        before=before if before else {"per_class": after["per_class"], "confusion": after["confusion"]},
        after=after if before else None, dataset=train_ds, eval_transform=tf, summary_rows=rows,
    )  # fmt: skip
    print(f"report: {path}")


def cmd_patch(args: argparse.Namespace) -> None:
    """``md-doctor patch``: the rest of the command line goes to its own two-stage parser."""
    patch_main(args.patch_args)


def cmd_split(args: argparse.Namespace) -> None:
    """``md-doctor split``: the rest of the command line goes to its own two-stage parser."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_split(parse_split_args(args.split_args))


_COMMANDS = {
    "split": cmd_split,
    "patch": cmd_patch,
    "diagnose": cmd_diagnose,
    "sift-low": cmd_sift_low,
    "masks": cmd_masks,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``md-doctor``.

    Args:
        argv: the command line without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after a one-line error (a bad flag included).
    """
    parser = create_parser()
    warnings.formatwarning = format_warning  # our warnings: one line each
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command == "patch":  # config-driven like train_md.py: its own two-stage parser
            args.patch_args = rest
        elif args.command == "split":
            args.split_args = rest
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            _COMMANDS[args.command](args)
    except MDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
