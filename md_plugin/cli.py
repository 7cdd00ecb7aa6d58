"""``md-doctor``: diagnosis and annotation tools outside training.

    md-doctor diagnose --model resnet32_cifar --checkpoint last.pth.tar --dataset torch/cifar10 --data-dir DATA
    md-doctor sift-low ... --out workspace/        # images worth annotating, opens in `labelme workspace/`
    md-doctor masks --annotations workspace/ --out masks/
    md-doctor report --diagnosis diagnosis.safetensors --checkpoint last.pth.tar --out report/
    md-doctor split -c split.yaml                    # CNNSplitter: per-class modules of a model
    md-doctor patch -c patch.yaml                    # CNNSplitter: patch a weak model's class

User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigError, MDError

__all__ = ["main", "create_parser"]


def _add_model_data(p: argparse.ArgumentParser, split: str = "train") -> None:
    g = p.add_argument_group("model and data (timm flag names)")
    g.add_argument("--model", required=True, help="timm model name, e.g. resnet32_cifar")
    g.add_argument("--checkpoint", required=True, help="trained weights (.pth.tar or .safetensors)")
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V")
    g.add_argument(
        "--dataset",
        default="",
        help="as in train_md.py (torch/cifar10, cifar10_lt, sklearn/digits, folder)",
    )
    g.add_argument("--data-dir", default=None)
    g.add_argument("--split", default=split)
    g.add_argument("--imb-ratio", type=float, default=100.0)
    g.add_argument("--imb-type", default="exp")
    g.add_argument("--imb-seed", type=int, default=0)
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N")
    g.add_argument("-b", "--batch-size", type=int, default=128)
    g.add_argument("-j", "--workers", type=int, default=0)


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="md-doctor", description="Model Doctor tools")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("diagnose", help="diagnose a trained model and save diagnosis.safetensors")
    _add_model_data(d)
    d.add_argument("--layers", default="last_conv")
    d.add_argument("--per-class", type=int, default=50)
    d.add_argument("--min-confidence", type=float, default=0.0)
    d.add_argument("--grad-mode", default="relu", choices=["relu", "abs"])
    d.add_argument("--gate-activation", action="store_true")
    d.add_argument("--mask-rule", default="theta", choices=["theta", "mean", "topk"])
    d.add_argument("--theta", type=float, default=0.2)
    d.add_argument("--topk", type=int, default=None)
    d.add_argument(
        "--allow-val", action="store_true", help="permit a non-training split (leaks it)"
    )
    d.add_argument("--out", default="diagnosis.safetensors")
    d.add_argument("--overwrite", action="store_true")

    s = sub.add_parser(
        "sift-low", help="write an annotation workspace of low-confidence training images"
    )
    _add_model_data(s)
    s.add_argument("--per-class", type=int, default=20)
    s.add_argument("--low", type=float, default=0.6)
    s.add_argument("--high", type=float, default=0.8)
    s.add_argument(
        "--misclassified-first",
        action="store_true",
        help="official ordering: confidently wrong images first",
    )
    s.add_argument("--size", type=int, default=128, help="PNG size for annotation")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")

    m = sub.add_parser("masks", help="convert labelme annotations to foreground masks")
    m.add_argument(
        "--annotations", required=True, help="the workspace folder with labelme JSON files"
    )
    m.add_argument("--out", required=True)
    m.add_argument("--dataset-size", type=int, default=None, help="reject indices >= this")
    m.add_argument(
        "--labels",
        nargs="*",
        default=None,
        help="only shapes with these labels count as foreground",
    )
    m.add_argument("--overwrite", action="store_true")

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

    r = sub.add_parser("report", help="figures + report.html for a diagnosis (and treatment)")
    r.add_argument("--diagnosis", required=True)
    _add_model_data(r, split="validation")
    r.add_argument(
        "--before-checkpoint",
        default="",
        help="the model before treatment, for before/after figures",
    )
    r.add_argument("--train-split", default="train", help="images for the gradient overlays")
    r.add_argument("--out", required=True)
    return p


def _kwargs(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--model-kwargs expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _setup(args: argparse.Namespace, split: str | None = None):
    """Model with weights, the untransformed dataset of ``split`` and the eval transform."""
    import timm
    from timm.data import resolve_data_config

    from . import models  # noqa: F401
    from .data.datasets import create_dataset, get_targets
    from .data.transforms import create_eval_transform
    from .train.checkpoint import load_weights

    _check_loader_args(args)
    split = split or args.split
    size = args.input_size[-1] if args.input_size else 32
    ds = create_dataset(
        args.dataset, args.data_dir, split, imb_ratio=args.imb_ratio, imb_type=args.imb_type,
        imb_seed=args.imb_seed, input_size=size,
    )  # fmt: skip
    num_classes = args.num_classes or max(get_targets(ds)) + 1
    if not timm.is_model(args.model):
        raise ConfigError(f"unknown model {args.model!r}")
    model = timm.create_model(args.model, num_classes=num_classes, **_kwargs(args.model_kwargs))
    load_weights(model, args.checkpoint)
    cfg = {"input_size": tuple(args.input_size)} if args.input_size else {}
    data_config = resolve_data_config(cfg, model=model)
    return model, ds, create_eval_transform(data_config), num_classes, data_config


def _loader(ds, transform, args):
    from torch.utils.data import DataLoader

    from .data.datasets import TransformedDataset

    return DataLoader(
        TransformedDataset(ds, transform),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
    )


def _check_loader_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")


def _guard_out(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise MDError(f"{path} exists; pass --overwrite to replace it")


def cmd_diagnose(args: argparse.Namespace) -> None:
    from .data.datasets import get_class_names
    from .doctor import diagnose
    from .doctor.masks import check_mask_options
    from .train.tables import format_diagnosis_table

    # everything that does not need the model is checked before loading data and weights
    check_mask_options(args.mask_rule, args.theta, args.topk)
    if args.per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {args.per_class}")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    _check_loader_args(args)
    if args.split.lower() not in ("train", "training") and not args.allow_val:
        raise ConfigError(
            f"refusing to diagnose on split {args.split!r}: diagnosis must use training images "
            "(pass --allow-val to force it)"
        )
    out = Path(args.out)
    _guard_out(out, args.overwrite)
    model, ds, tf, k, data_config = _setup(args)
    diag = diagnose(
        model, _loader(ds, tf, args), args.layers, k, per_class=args.per_class,
        min_confidence=args.min_confidence, grad_mode=args.grad_mode,
        gate_activation=args.gate_activation, mask_rule=args.mask_rule, theta=args.theta,
        topk=args.topk, progress=sys.stderr.isatty(), input_size=data_config["input_size"],
    )  # fmt: skip
    diag.save(out)
    print(format_diagnosis_table(diag, get_class_names(ds, k)))
    print(f"saved {out}")


def cmd_sift_low(args: argparse.Namespace) -> None:
    from .annotate import write_workspace
    from .data.datasets import get_class_names
    from .doctor.sift_low import sift_low_confidence

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
    from .annotate import labelme_to_masks

    report = labelme_to_masks(
        args.annotations, args.out, dataset_size=args.dataset_size, overwrite=args.overwrite,
        foreground_labels=args.labels,
    )  # fmt: skip
    print(report.summary())
    if not report.written and report.skipped:
        raise MDError("no mask was written")


def cmd_report(args: argparse.Namespace) -> None:
    import copy

    import torch
    from accelerate import Accelerator

    from .data.datasets import create_dataset, get_class_names
    from .doctor import Diagnosis
    from .train.checkpoint import load_weights
    from .train.engine import evaluate
    from .train.report_hook import build_report

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
    from .splitter.patch_cli import main as patch_main

    patch_main(args.patch_args)


def cmd_split(args: argparse.Namespace) -> None:
    import logging

    from .splitter.cli import cmd_split as run_split
    from .splitter.cli import parse_split_args

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
    parser = create_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "patch":  # config-driven like train_md.py: its own two-stage parser
        args.patch_args = rest
    elif args.command == "split":
        args.split_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            _COMMANDS[args.command](args)
    except MDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
