"""``md-doctor patch``: patch a weak model's target class with a CNNSplitter module.

    md-doctor patch -c patch.yaml
    md-doctor patch --weak-model simcnn_weak --weak-checkpoint weak/model_best.pth.tar \\
        --strong-model resnet20_cifar --strong-checkpoint strong/model_best.pth.tar \\
        --modules modules.safetensors --module-class 0 \\
        --dataset torch/cifar10 --data-dir DATA --class-map weak.txt --split validation \\
        --out patched.pth.tar

Config-driven like ``train_md.py``: YAML keys are the flags' destination names, the command line
wins, unknown keys and bad values are one-line errors. Prints the before/after table (TC
precision, recall, F1; non-TC accuracy; accuracy), writes ``--results`` JSON and, with
``--out``, the patched model (a checkpoint whose ``state_dict`` loads into
:func:`load_patched`). Nothing is tuned: the evaluation split is only measured.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ..checkpoint import atomic_save, load_checkpoint_file, load_weights, state_dict_of
from ..cli_common import (
    add_dataset_flags,
    add_loader_flags,
    check_loader_args,
    check_writable_file,
    create_eval_loader,
    create_model,
    eval_data_config,
)
from ..config import Parser, apply_config
from ..data.class_map import apply_class_map
from ..data.datasets import create_dataset, create_datasets, get_class_names
from ..data.transforms import create_eval_transform
from ..errors import ConfigError, MDError
from ..files import atomic_write_text
from .groups import create_split_graph
from .head import ModuleHeads
from .masking import create_masked_model
from .modules import SplitModules
from .patch import PatchedModel, evaluate_patch, own_class_range

__all__ = ["create_patch_parser", "parse_patch_args", "run_patch", "load_patched", "format_table"]


def create_patch_parser() -> argparse.ArgumentParser:
    """The ``md-doctor patch`` parser (flags = YAML keys; ``--help`` shows every default).

    Returns:
        A :class:`~md_plugin.config.Parser` (one-line errors).
    """
    p = Parser(
        prog="md-doctor patch",
        description="patch a weak model's target class with a CNNSplitter module (no training)",
        null_values={"class_map": ""},  # as train_md.py reads it
    )
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML config")
    g = p.add_argument_group("models")
    g.add_argument("--weak-model", required=False, default=None, help="timm name of the weak model")
    g.add_argument("--weak-checkpoint", default=None, help="weights of the weak model")
    g.add_argument(
        "--weak-num-classes", type=int, default=None,
        help="the weak model's outputs (default: read from its checkpoint)",
    )  # fmt: skip
    g.add_argument("--strong-model", default=None, help="timm name of the split (strong) model")
    g.add_argument("--strong-checkpoint", default=None, help="weights of the strong model")
    g.add_argument(
        "--strong-num-classes", type=int, default=None,
        help="the strong model's outputs (default: read from its checkpoint)",
    )  # fmt: skip
    g.add_argument(
        "--modules", default="", help="modules file from `md-doctor split` (safetensors)"
    )
    g.add_argument(
        "--whole-strong",
        action="store_true",
        default=False,
        help="baseline: patch with the whole strong model instead of a module (its own-class "
        "range is measured on the held-out images of --range-data)",
    )
    g.add_argument(
        "--target-class",
        type=int,
        default=-1,
        help="the target class's index in the weak model's outputs (default: the last)",
    )
    g.add_argument(
        "--module-class",
        type=int,
        default=None,
        help="the target class's index in the strong model's outputs (its module)",
    )
    g.add_argument(
        "--module-score",
        default="range",
        choices=["range", "head"],
        help="what replaces the weak TC probability: range (the paper's own logit, min-max "
        "normalised on the class's held-out images) or head (a gradient split's module head, "
        "GradSplitter's; it over-fires on classes the strong model never saw: docs/splitter.md)",
    )
    g = p.add_argument_group("data (as in train_md.py)")
    add_dataset_flags(g)
    g.add_argument("--split", default="validation", help="the evaluation split (never tuned on)")
    g.add_argument(
        "--class-map", default="", help="class map of the weak task (timm's --class-map)"
    )
    add_loader_flags(g, batch_size=256)
    g = p.add_argument_group("whole-strong baseline: where its own-class range comes from")
    g.add_argument("--range-data", default="", help="args.yaml of the strong model's training run")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="", help="save the patched model here (.pth.tar)")
    g.add_argument("--results", default="", help="write before/after metrics as JSON")
    g.add_argument(
        "--overwrite", action="store_true", default=False, help="replace --out/--results"
    )
    g.add_argument("--device", default="cpu", help="where the evaluation runs (cpu, cuda, ...)")
    return p


def parse_patch_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse (YAML defaults, then flags), then the checks train_md.py would make.

    Args:
        argv: the arguments after ``patch``.

    Returns:
        The namespace; the required models, one module source and writable outputs checked.

    Raises:
        MDError: one line for a missing or bad flag, or an output that exists or cannot be
            written.
    """
    parser = create_patch_parser()
    known, rest = apply_config(parser, argv)
    args = parser.parse_args(rest)
    args.config = known.config
    for flag in ("weak_model", "weak_checkpoint", "strong_model", "strong_checkpoint"):
        if not getattr(args, flag):
            raise ConfigError(
                f"--{flag.replace('_', '-')} is required (flag or config key {flag!r})"
            )
    if args.module_class is None:
        raise ConfigError(
            "--module-class is required: the target class's index in the strong model"
        )
    if bool(args.modules) == bool(args.whole_strong):
        raise ConfigError("give exactly one of --modules FILE and --whole-strong")
    if args.whole_strong and not args.range_data:
        raise ConfigError(
            "--whole-strong needs --range-data (the strong run's args.yaml: its held-out "
            "validation images give the own-class range)"
        )
    check_loader_args(args)
    for flag, path in (("--out", args.out), ("--results", args.results)):
        if path and Path(path).exists() and not args.overwrite:
            raise MDError(f"{path} exists; pass --overwrite to replace it")
        if path:
            check_writable_file(path, flag)  # a read-only folder: one line before any work
    return args


def _num_classes_of(path: str) -> int:
    """Outputs of a checkpoint's classifier: the last 2-D weight's first dimension."""
    sd = state_dict_of(load_checkpoint_file(path))
    mats = [v for v in sd.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
    if not mats:
        raise MDError(f"cannot tell the number of classes of {path}; pass --*-num-classes")
    return int(mats[-1].shape[0])


def _same_input(a: dict[str, Any], b: dict[str, Any]) -> None:
    keys = ("input_size", "mean", "std", "crop_pct")
    diff = [k for k in keys if tuple(a.get(k) or ()) != tuple(b.get(k) or ())] if a != b else []
    if diff:
        raise ConfigError(
            f"the weak and strong models expect different inputs ({', '.join(diff)}); a patched "
            "model feeds both the same image"
        )


def _strong_range(args, strong: nn.Module, transform) -> tuple[float, float]:
    """Own-class range of the whole strong model on its run's held-out validation images."""
    path = Path(args.range_data)
    if not path.is_file():
        raise ConfigError(f"--range-data: file not found: {path}")
    run = yaml.safe_load(path.read_text()) or {}
    if not run.get("val_from_train"):
        raise ConfigError(
            f"{path}: the strong run has no --val-from-train hold-out; its own-class range must "
            "come from images it never fit"
        )
    s = create_datasets(
        run["dataset"], run["data_dir"], run.get("train_split", "train"),
        run.get("val_split", "validation"), class_map=run.get("class_map") or None,
        class_cap=run.get("class_cap"), val_from_train=run["val_from_train"],
        data_seed=run.get("data_seed", 0),
    )  # fmt: skip
    return own_class_range(
        strong,
        create_eval_loader(s.val, transform, args.batch_size, args.workers),
        args.module_class,
    )


def build_patched(args: argparse.Namespace) -> tuple[PatchedModel, dict[str, Any], Any]:
    """The patched model, its description (saved with it) and the eval transform.

    Args:
        args: from :func:`parse_patch_args`.

    Returns:
        ``(patched model in eval mode, description dict, eval transform)``.
    """
    head = None  # a gradient-search module's head
    weak = create_model(
        args.weak_model, args.weak_num_classes or _num_classes_of(args.weak_checkpoint)
    )
    load_weights(weak, args.weak_checkpoint)
    strong = create_model(
        args.strong_model, args.strong_num_classes or _num_classes_of(args.strong_checkpoint)
    )
    load_weights(strong, args.strong_checkpoint)
    weak.eval()
    strong.eval()
    cfg_w, cfg_s = (
        eval_data_config(weak, args.input_size),
        eval_data_config(strong, args.input_size),
    )
    _same_input(cfg_w, cfg_s)
    tf = create_eval_transform(cfg_s)
    n_strong = strong.num_classes if hasattr(strong, "num_classes") else None
    if n_strong is not None and not 0 <= args.module_class < n_strong:
        raise ConfigError(
            f"--module-class {args.module_class} is out of range: the strong model has "
            f"{n_strong} classes"
        )
    n_weak = getattr(weak, "num_classes", None)
    if n_weak is not None and not -n_weak <= args.target_class < n_weak:
        raise ConfigError(
            f"--target-class {args.target_class} is out of range: the weak model has {n_weak} "
            "classes"
        )
    meta: dict[str, Any] = {
        "weak_model": args.weak_model,
        "weak_num_classes": n_weak,
        "strong_model": args.strong_model,
        "strong_num_classes": n_strong,
        "target_class": args.target_class % n_weak if n_weak else args.target_class,
        "module_class": args.module_class,
        "input_size": list(cfg_s["input_size"]),
    }
    if args.whole_strong:
        module: nn.Module = strong
        lo, hi = _strong_range(args, strong, tf)
        meta.update(module_kind="whole_strong", range_source=str(args.range_data))
    else:
        mods = SplitModules.load(args.modules, strong, cfg_s["input_size"])
        module = mods.module(args.module_class)
        if args.module_score == "head":
            head = mods.module_head(args.module_class)
            if head is None:
                raise ConfigError(
                    "--module-score head: these modules have no heads (a GA split); use range"
                )
        lo, hi = (0.0, 1.0) if head is not None else mods.range(args.module_class)
        meta.update(module_kind="masked", modules=str(args.modules), module_head=head is not None)
        st = next(
            (m for m in mods.stats.get("modules", []) if m.get("cls") == args.module_class), None
        )
        if st:
            meta["module_stats"] = st
    patched = PatchedModel(weak, module, meta["target_class"], args.module_class, (lo, hi), head)
    meta["value_range"] = [lo, hi]
    return patched.eval(), meta, tf


def load_patched(path: str | Path, input_size: Sequence[int] | None = None) -> PatchedModel:
    """Rebuild a patched model saved by ``md-doctor patch --out`` (weights and masks included).

    Args:
        path: the file ``--out`` wrote.
        input_size: (C, H, W) to trace the strong model at (default: the recorded one).

    Returns:
        The :class:`PatchedModel`, in eval mode.
    """
    ck = load_checkpoint_file(path)
    meta = ck.get("patch") if isinstance(ck, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ck:
        raise MDError(f"{path} is not a patched model saved by `md-doctor patch --out`")
    weak = create_model(meta["weak_model"], meta["weak_num_classes"])
    strong = create_model(meta["strong_model"], meta["strong_num_classes"])
    module: nn.Module = strong
    if meta["module_kind"] == "masked":
        module = create_masked_model(
            create_split_graph(strong, input_size or meta.get("input_size"))
        )
    head = None
    if meta.get("module_head"):
        head = ModuleHeads(1, meta["strong_num_classes"]).select(0)  # weights from the state dict
    p = PatchedModel(
        weak, module, meta["target_class"], meta["module_class"], meta["value_range"], head
    )
    try:
        p.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise MDError(
            f"{path} does not fit its recorded models: {str(e).splitlines()[0]}"
        ) from None
    return p.eval()


_ROWS = [
    ("tc_precision", "TC precision (%)"),
    ("tc_recall", "TC recall (%)"),
    ("tc_f1", "TC F1 (%)"),
    ("non_tc_acc", "non-TC accuracy (%)"),
    ("acc", "accuracy (%)"),
]


def format_table(result: dict[str, dict[str, Any]]) -> str:
    """Before/after table with the change in points.

    Args:
        result: ``{"before": metrics, "after": metrics}`` as :func:`evaluate_patch` returns.

    Returns:
        The table as text, one row per metric.
    """
    b, a = result["before"], result["after"]
    lines = [f"{'':22s} {'before':>8s} {'after':>8s} {'change':>8s}"]
    for k, label in _ROWS:
        lines.append(f"{label:22s} {b[k]:8.2f} {a[k]:8.2f} {a[k] - b[k]:+8.2f}")
    lines.append(
        f"{'TC images / others':22s} {b['n_tc']:>8d} {b['n_non_tc']:>8d}"
        f"   (TP/FP/FN before {b['tp']}/{b['fp']}/{b['fn']}, after {a['tp']}/{a['fp']}/{a['fn']})"
    )
    return "\n".join(lines)


def run_patch(args: argparse.Namespace) -> dict[str, Any]:
    """Build, evaluate before/after on ``--split``, print the table, save what was asked.

    Args:
        args: from :func:`parse_patch_args`.

    Returns:
        What ``--results`` records (written after ``--out``, so it only exists for a saved
        patch).
    """
    patched, meta, tf = build_patched(args)
    ds = create_dataset(args.dataset, args.data_dir, args.split, input_size=meta["input_size"][-1])
    if args.class_map:
        ds = apply_class_map(ds, args.class_map, args.data_dir)
    names = get_class_names(ds, meta["weak_num_classes"] or 0)
    result = evaluate_patch(
        patched, create_eval_loader(ds, tf, args.batch_size, args.workers), args.device
    )
    tc = meta["target_class"]
    print(
        f"patch: weak {args.weak_model} target class {tc} ({names[tc] if tc < len(names) else tc}) "
        f"<- {meta['module_kind']} module of {args.strong_model} class {args.module_class}, "
        f"range ({meta['value_range'][0]:.4g}, {meta['value_range'][1]:.4g}); split {args.split!r}"
    )
    print(format_table(result))
    out = {"patch": meta, "split": args.split, "classes": names, **result}
    if args.out:  # the model first: --results then records a patch that was saved
        ck = {"state_dict": patched.state_dict(), "patch": meta, "arch": "PatchedModel"}
        atomic_save(ck, args.out)
        print(f"saved {args.out} (load with md_plugin.splitter.patch_cli.load_patched)")
    if args.results:
        atomic_write_text(args.results, json.dumps(out, indent=1))
        print(f"saved {args.results}")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``md-doctor patch`` (errors propagate as ``MDError``; the caller prints).

    Args:
        argv: the arguments after ``patch``.

    Returns:
        What ``--results`` records: the patch description and the before/after metrics.
    """
    return run_patch(parse_patch_args(argv))
