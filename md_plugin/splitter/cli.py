"""``md-doctor split``: importance, sensitivity, search, calibration, modules file and table.

    md-doctor split --model resnet20_cifar --checkpoint last.pth.tar --dataset torch/cifar10 \\
        --data-dir DATA --val-from-train 5000 --classes 0 1 2 3 4 --experiment r20
    md-doctor split -c configs/split_resnet20_cifar10.yaml --generations 40
    md-doctor split -c configs/split_resnet20_cifar10.yaml --search gradient --calibrate affine

Like ``train_md.py``: ``-c FILE.yaml`` sets defaults (keys are the flags' destination names,
unknown keys are errors naming the closest valid one), the command line wins, bad input is one
line. The run folder ``<--output>/<--experiment>`` gets ``args.yaml``, ``search_state.pt``
(rewritten atomically every generation), ``modules.safetensors``, ``modules.csv``,
``history.csv``, ``split.log`` and, with ``--init-ratios auto``, ``sensitivity.csv`` and
``sensitivity.png``. A folder holding a run is refused unless ``--resume`` continues its search;
the folder is locked while a split runs (:mod:`md_plugin.rundir`), every file is written
atomically, and a split that fails before its search saved a state removes what it wrote.

Images: the held-out validation images (``--val-from-train``) select and measure (importance,
sensitivity, GA fitness, ranges, accuracies); ``--calibrate bn|affine`` fits on
``--calibrate-images`` *training* images of the split classes (the training split minus the
held-out images). ``--search gradient`` (GradSplitter) learns its masks and module heads on all
training images of the split classes; a ``--val-images`` subset of the held-out ones chooses
its epoch.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import load_weights
from ..cli_common import (
    add_dataset_flags,
    add_loader_flags,
    add_model_flags,
    check_loader_args,
    create_eval_loader,
    create_model,
    eval_data_config,
)
from ..config import Parser, apply_config, args_to_yaml_dict
from ..data.datasets import create_datasets, get_targets
from ..data.transforms import create_eval_transform
from ..errors import ConfigError, MDError
from ..files import atomic_write, atomic_write_text
from ..rundir import RunDirLock, prepare_run_dir
from .calibrate import CALIBRATION_MODES, CalibrationConfig
from .cli_config import parse_init_ratios, search_config, stage_configs
from .gradinit import MASK_INITS
from .gradsearch import GradConfig
from .search import SearchConfig
from .sensitivity import SensitivityTable, plot_sensitivity
from .split import SensitivityConfig, modularize, stratified_subset

__all__ = ["create_split_parser", "parse_split_args", "split_main", "format_modules_table"]

_logger = logging.getLogger("md_plugin.splitter")

# what a YAML null means for keys whose default is not None (as train_md.py reads them)
_NULL_VALUES = {"class_map": "", "output": "", "experiment": ""}


def create_split_parser() -> argparse.ArgumentParser:
    """The ``md-doctor split`` parser (flags = YAML keys; ``--help`` shows every default).

    Returns:
        A :class:`~md_plugin.config.Parser` (one-line errors).
    """
    d, dg = SearchConfig(), GradConfig()
    p = Parser(
        prog="md-doctor split",
        description=__doc__.split("\n\n")[0],
        null_values=_NULL_VALUES,
    )
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file of flag defaults")
    g = p.add_argument_group("strong model and data (timm / train_md.py flag names)")
    add_model_flags(g, required=False, what="the strong model")
    add_dataset_flags(g, default="torch/cifar10")
    g.add_argument("--train-split", default="train", help="the strong model's training split")
    g.add_argument(
        "--val-split", default="validation",
        help="the validation split when there is no --val-from-train",
    )  # fmt: skip
    g.add_argument("--class-map", default="", help="as in train_md.py: subset/relabel classes")
    g.add_argument("--val-from-train", default=None,
                   help="hold out N images (or a fraction) of the training split as validation, "
                   "as the strong model's training run did (same --data-seed)")  # fmt: skip
    g.add_argument("--data-seed", type=int, default=0, help="seed of --val-from-train")
    add_loader_flags(g, batch_size=d.batch_size)
    s = p.add_argument_group("split (CNNSplitter)")
    s.add_argument("--classes", type=int, nargs="+", default=None,
                   help="model output indices to split (default: all)")  # fmt: skip
    s.add_argument("--search", default="ga", choices=["ga", "gradient"],
                   help="ga: CNNSplitter's genetic search (faithful); gradient: GradSplitter's "
                   "mask search with module heads, learning on the training images")  # fmt: skip
    s.add_argument("--min-confidence", type=float, default=0.9,
                   help="importance uses class-c images with softmax(c) >= this")  # fmt: skip
    s.add_argument("--generations", type=int, default=d.generations, help="GA generations")
    s.add_argument("--population", type=int, default=d.population, help="GA population per class")
    s.add_argument("--val-images", type=int, default=d.val_images,
                   help="stratified validation subset the GA scores on (the gradient search: "
                   "chooses its epoch on)")  # fmt: skip
    s.add_argument("--seed", type=int, default=d.seed, help="seed of the search")
    s.add_argument("--mutation", type=float, default=d.mutation,
                   help="fraction of genes reset per offspring")  # fmt: skip
    s.add_argument("--parents-frac", type=float, default=d.parents_frac,
                   help="fraction of the population that breeds")  # fmt: skip
    s.add_argument("--keep-frac", type=float, default=d.keep_frac,
                   help="fraction of the population kept as is (elitism)")  # fmt: skip
    s.add_argument("--alpha", type=float, default=d.alpha,
                   help="fitness weight of accuracy against kernel diversity")  # fmt: skip
    s.add_argument("--gamma", type=float, default=d.gamma,
                   help="accuracy target: below it the accuracy weight rises by the shortfall")  # fmt: skip
    s.add_argument("--eval-mode", default=d.eval_mode, choices=["extracted", "masked"],
                   help="score modules as extracted sub-networks or as the masked strong model")  # fmt: skip
    _add_stage_flags(p, s)
    gr = p.add_argument_group("gradient search (--search gradient; GradSplitter)")
    gr.add_argument("--epochs", type=int, default=dg.epochs,
                    help="head-only epochs, then cycles of 5 mask and 2 head epochs")  # fmt: skip
    gr.add_argument("--head-epochs", type=int, default=dg.head_epochs,
                    help="head-only epochs before the first mask epoch (GradSplitter: 5)")  # fmt: skip
    gr.add_argument("--images-per-epoch", type=int, default=dg.images_per_epoch,
                    help="training images drawn (seeded) per epoch")  # fmt: skip
    gr.add_argument("--mask-lr", type=float, default=dg.mask_lr,
                    help="Adam learning rate of the mask values (GradSplitter: 1e-3 over ~70k "
                    "steps; ours has a few hundred)")  # fmt: skip
    gr.add_argument("--head-lr", type=float, default=dg.head_lr,
                    help="Adam learning rate of the heads in the first head epochs; later "
                    "epochs use a tenth")  # fmt: skip
    gr.add_argument("--kernel-alpha", type=float, default=dg.alpha,
                    help="weight of the kept-kernel fraction in the loss (default: 0.1, "
                    "GradSplitter's; 1.0 with a kernel target)")  # fmt: skip
    gr.add_argument("--target-kernels", type=float, default=dg.target_kernels,
                    help="penalise only each module's kept fraction above this, in (0, 1]")  # fmt: skip
    gr.add_argument("--mask-init", default=None, choices=list(MASK_INITS),
                    help="starting mask values: ones (GradSplitter's; the default), auto (ones, "
                    "and the layer sensitivity's keep ratios set --target-kernels; the default "
                    "with --init-ratios auto) or importance (all on, ranked by CNNSplitter's "
                    "per-class importance)")  # fmt: skip
    gr.add_argument("--select-tolerance", type=float, default=dg.select_tolerance,
                    help="the chosen epoch: fewest kernels within this many points of the strong "
                    "model's validation accuracy")  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--output", default="output/split", help="root of the run folders")
    o.add_argument("--experiment", default="",
                   help="run folder name under --output (default: date-time and model)")  # fmt: skip
    o.add_argument("--resume", action="store_true",
                   help="continue the search saved in the run folder")  # fmt: skip
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _add_stage_flags(p: argparse.ArgumentParser, s: argparse._ArgumentGroup) -> None:
    """The initial keep ratios (sensitivity) flags into the split group ``s``, and the module
    calibration group (issue 18)."""
    d, dc, ds = SearchConfig(), CalibrationConfig(), SensitivityConfig()
    s.add_argument("--init-ratios", nargs="+", default=None, metavar="R",
                   help="'auto' (the GA's default): each group's initial keep ratios from the "
                   "layer sensitivity, and with --search gradient the kernel target they "
                   "leave (--mask-init auto); or keep ratios for the later groups (the paper's "
                   f"forward-order rule, e.g. {' '.join(map(str, d.ratios))})")  # fmt: skip
    s.add_argument("--init-ratios-sensitive", type=float, nargs="+", metavar="R", default=None,
                   help="with numeric --init-ratios: keep ratios for the first "
                   f"--sensitive-fraction of the groups (default {' '.join(map(str, d.ratios_sensitive))})")  # fmt: skip
    s.add_argument("--sensitive-fraction", type=float, default=None,
                   help=f"with numeric --init-ratios (default {d.sensitive_fraction})")  # fmt: skip
    s.add_argument("--sensitivity-images", type=int, default=ds.images,
                   help="--init-ratios auto: stratified held-out images the sensitivity "
                   "analysis composes on")  # fmt: skip
    s.add_argument("--sensitivity-tolerance", type=float, default=ds.tolerance,
                   help="--init-ratios auto: a group starts at the smallest keep ratio whose "
                   "composed accuracy stays within this many points of the strong model's")  # fmt: skip
    c = p.add_argument_group("module calibration (a deviation from the paper)")
    c.add_argument("--calibrate", default=dc.mode, choices=list(CALIBRATION_MODES),
                   help="bn: re-estimate each module's BatchNorm statistics; affine: then learn "
                   "a per-channel scale and shift at every mask site (logit MSE to the strong "
                   "model); both on training images, folded into the modules")  # fmt: skip
    c.add_argument("--calibrate-images", type=int, default=dc.images,
                   help="stratified training images of the split classes (not the held-out "
                   "ones)")  # fmt: skip
    c.add_argument("--calibrate-steps", type=int, default=dc.steps, help="affine: Adam steps")
    c.add_argument("--calibrate-lr", type=float, default=dc.lr, help="affine: Adam learning rate")
    c.add_argument("--calibrate-batch-size", type=int, default=dc.batch_size,
                   help="affine: images per step, shared by all modules")  # fmt: skip


def parse_split_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: YAML defaults, then the command line (as train_md.py).

    Args:
        argv: the arguments after ``split`` (``None``: ``sys.argv[1:]``).

    Returns:
        The namespace, with the model, the checkpoint and the loader flags checked.
    """
    parser = create_split_parser()
    apply_config(parser, argv)
    args = parser.parse_args(argv)
    if not args.model or not args.checkpoint:
        raise ConfigError("md-doctor split needs --model and --checkpoint (the strong model)")
    check_loader_args(args)
    _check_classes(args.classes)
    return args


def _check_classes(classes: Sequence[int] | None, num_outputs: int | None = None) -> None:
    """``--classes``: at least two, each once, each a model output (when that is known)."""
    if classes is None:
        return
    twice = sorted({c for c in classes if list(classes).count(c) > 1})
    if twice:
        listed = ", ".join(map(str, twice))
        raise ConfigError(f"--classes lists {listed} more than once: give each class once")
    if len(classes) < 2:
        raise ConfigError(f"--classes needs at least two classes to split, got {list(classes)}")
    bad = [c for c in classes if c < 0 or (num_outputs is not None and c >= num_outputs)]
    if bad:
        outputs = f": the model has {num_outputs} outputs" if num_outputs is not None else ""
        raise ConfigError(f"class(es) {bad} out of range{outputs}")


def _val_from_train(v: Any) -> int | float | None:
    if v in (None, "", 0, "0"):
        return None
    try:
        f = float(v)
    except ValueError:
        raise ConfigError(f"--val-from-train expects a count or a fraction, got {v!r}") from None
    return int(f) if f >= 1 else f


def _data(args: argparse.Namespace):
    """The strong model with weights, a validation loader in its output space and, for
    ``--calibrate bn|affine``, a loader of training images of the split classes."""
    size = args.input_size[-1] if args.input_size else 32
    splits = create_datasets(
        args.dataset, args.data_dir, args.train_split, args.val_split,
        class_map=args.class_map or None, val_from_train=_val_from_train(args.val_from_train),
        data_seed=args.data_seed, input_size=size,
    )  # fmt: skip
    if splits.test is None:
        _logger.warning(
            "validating on --val-split %r (no --val-from-train): for CIFAR that is the test set; "
            "hold out training images when the numbers will be reported",
            args.val_split,
        )
    num_classes = args.num_classes or (max(get_targets(splits.train)) + 1)
    _check_classes(args.classes, num_classes)
    model = create_model(args.model, num_classes, args.model_kwargs)
    load_weights(model, args.checkpoint)
    data_config = eval_data_config(model, args.input_size)
    transform = create_eval_transform(data_config)
    loader = create_eval_loader(splits.val, transform, args.batch_size, args.workers)
    names = getattr(splits.val, "classes", None)
    train = _calibration_loader(args, splits.train, num_classes, transform)
    return model, loader, data_config, (list(names) if names else None), train


def _calibration_loader(args: argparse.Namespace, train, num_classes: int, transform):
    """A loader over a stratified, seeded ``--calibrate-images`` subset of the training split's
    images of the split classes (eval transforms), all of them for ``--search gradient``; None
    for ``--calibrate none`` with the GA. With ``--val-from-train`` the training split already
    lacks the held-out images."""
    gradient = args.search == "gradient"  # the gradient search learns on all of them
    if args.calibrate == "none" and not gradient:
        return None
    classes = args.classes or list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"class(es) {bad} out of range: the model has {num_classes} outputs")
    targets = torch.tensor(get_targets(train))
    have = [c for c in classes if (targets == c).any()]
    if len(have) < len(classes):
        missing = sorted(set(classes) - set(have))
        raise ConfigError(
            f"{'--search gradient' if gradient else f'--calibrate {args.calibrate}'} needs "
            f"training images of every split class; the training split has none of class(es) "
            f"{missing}{'' if gradient else ' (use --calibrate none)'}"
        )
    if gradient:
        pick = torch.isin(targets, torch.tensor(classes)).nonzero().flatten().numpy()
    else:
        pick = stratified_subset(targets, classes, args.calibrate_images, args.seed)
    subset = torch.utils.data.Subset(train, pick.tolist())
    return create_eval_loader(subset, transform, args.batch_size, args.workers)


def format_modules_table(mods, class_names: Sequence[str] | None = None) -> str:
    """Per-module cost and accuracy, then composed vs strong accuracy.

    Args:
        mods: measured :class:`~md_plugin.splitter.SplitModules`.
        class_names: names by output index (default: the indices).

    Returns:
        The table as text.
    """
    st = mods.stats
    head = f"{'class':>14} {'kernels%':>9} {'FLOPs%':>8} {'params%':>8} {'own acc%':>9} "
    head += f"{'logit min':>10} {'logit max':>10}"
    lines = [head]
    for m in st["modules"]:
        c = m["cls"]
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        lines.append(
            f"{name[:14]:>14} {m['kernels_pct']:9.1f} {m['flops_pct']:8.1f} {m['params_pct']:8.1f} "
            f"{m['own_acc']:9.2f} {m['logit_min']:10.3f} {m['logit_max']:10.3f}"
        )
    lines.append(
        f"composed {mods.num_modules}-module accuracy {st['composed_acc']:.2f}% vs strong model "
        f"{st['strong_acc']:.2f}% on {st['val_images']} validation images "
        f"(difference {st['composed_acc'] - st['strong_acc']:+.2f} points)"
    )
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV table, written atomically (a full disk leaves no torn file)."""
    if not rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_sensitivity(out: Path, table: dict[str, Any] | None) -> None:
    """sensitivity.csv and sensitivity.png beside the modules file."""
    if not table:
        return
    t = SensitivityTable(**table)
    _write_csv(out / "sensitivity.csv", t.rows())
    atomic_write(out / "sensitivity.png", lambda f: plot_sensitivity(t, f))


def format_timings(options: dict[str, Any]) -> str:
    """One line: each stage's wall seconds (CPU seconds of the process in brackets), the
    total, and the best generation.

    Args:
        options: a modules file's ``options`` (``timings``, ``best_generation``).

    Returns:
        The line, e.g. ``time: importance 3 s (3), search 40 s (21); total 43 s (24 s CPU);
        best generation 7``.
    """
    t = options.get("timings", {})
    names = ("importance", "sensitivity", "search", "calibration", "measure")
    done = [n for n in names if f"{n}_s" in t]
    parts = [f"{n} {t[f'{n}_s']:.0f} s ({t.get(f'{n}_cpu_s', float('nan')):.0f})" for n in done]
    wall = sum(t[f"{n}_s"] for n in done)
    cpu = sum(t.get(f"{n}_cpu_s", 0.0) for n in done)
    line = f"time: {', '.join(parts)}; total {wall:.0f} s ({cpu:.0f} s CPU)"
    if "best_generation" in options:
        line += f"; best generation {options['best_generation'] + 1}"
    if "best_epoch" in options:
        line += f"; chosen epoch {options['best_epoch'] + 1}"
    return line


# what a split writes into its run folder; a folder holding none of the first three is not a run
_RUN_FILES = ("search_state.pt", "modules.safetensors", "args.yaml")


def _run_dir(args: argparse.Namespace) -> Path:
    """``<--output>/<--experiment>`` (default name: the date-time and the model)."""
    name = args.experiment or "-".join(
        [datetime.now().strftime("%Y%m%d-%H%M%S"), args.model.replace("/", "_")]
    )
    return Path(args.output) / name


def _check_run_dir(out: Path, resume: bool) -> None:
    """Refuse a folder that holds a run unless --resume continues it, and a --resume that finds
    no search to continue."""
    if resume:
        if not (out / "search_state.pt").is_file():
            raise MDError(f"--resume: no search state in {out} (pass the run's --experiment)")
    elif any((out / f).exists() for f in _RUN_FILES):
        raise MDError(
            f"run folder {out} exists; pass --resume to continue its search or choose another "
            "--experiment"
        )


def _open_log(path: Path) -> Callable[[str], None]:
    """A ``log(msg)`` that prints and appends to ``split.log``; a failed write is one line."""

    def log(msg: str) -> None:
        print(msg, flush=True)
        try:
            with path.open("a") as f:
                f.write(msg + "\n")
        except OSError as e:
            raise MDError(f"cannot write {path}: {e.strerror or e}") from None

    return log


def _discard_unstarted(out: Path, created: bool, before: set[str]) -> None:
    """Undo a split that failed before its search saved any state: remove the files it wrote
    (and the folder, when it made it), so a retry of the same command is not refused."""
    if (out / "search_state.pt").exists():
        return  # the search ran: keep the folder for --resume
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in ("args.yaml", "split.log"):
        if name not in before:
            (out / name).unlink(missing_ok=True)


def cmd_split(args: argparse.Namespace) -> Path:
    """Run ``md-doctor split``: the run folder (locked), the split, its files and table.

    Args:
        args: from :func:`parse_split_args`.

    Returns:
        The path of ``modules.safetensors``.

    Raises:
        MDError: one line for bad input, a busy or unwritable run folder, or a failed write; a
            split that fails before its search saved a state leaves no files behind.
    """
    cfg = search_config(args, create_split_parser())
    sens, cal = stage_configs(args)
    if not 0.0 <= args.min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    out = _run_dir(args)
    _check_run_dir(out, args.resume)  # before any work
    created = not out.exists()
    prepare_run_dir(out)
    with RunDirLock(out) as lock:  # a second split of this folder is refused here
        _check_run_dir(out, args.resume)  # again: another split may have written it meanwhile
        if lock.describe_takeover():
            _logger.warning("%s: %s", out, lock.describe_takeover())
        before = {p.name for p in out.iterdir()}
        try:
            return _split(args, out, cfg, sens, cal)
        except BaseException:
            _discard_unstarted(out, created, before)
            raise


def _split(args: argparse.Namespace, out: Path, cfg, sens, cal) -> Path:
    """Inside the locked run folder: load, split, write the modules and tables."""
    model, loader, data_config, names, train_loader = _data(args)
    if not args.resume:
        atomic_write_text(
            out / "args.yaml", yaml.safe_dump(args_to_yaml_dict(args), sort_keys=False)
        )
    log = _open_log(out / "split.log")
    mods = modularize(
        model, loader, args.classes, cfg, min_confidence=args.min_confidence,
        init_ratios=parse_init_ratios(args)[0], sensitivity=sens, calibration=cal,
        train_loader=train_loader, state_path=str(out / "search_state.pt"),
        input_size=data_config["input_size"],
        progress=not args.no_progress and sys.stderr.isatty(), log=log,
    )  # fmt: skip
    mods.options["command"] = " ".join(["md-doctor", "split", *sys.argv[2:]])
    path = mods.save(out / "modules.safetensors")
    _write_csv(out / "modules.csv", mods.stats["modules"])
    _write_csv(out / "history.csv", mods.options["history"])
    _write_sensitivity(out, mods.options.get("sensitivity"))
    log(format_modules_table(mods, names))
    log(format_timings(mods.options))
    log(f"saved {path}")
    return path


def split_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``md-doctor split`` (user errors: one line, exit 2).

    Args:
        argv: the arguments after ``split``.

    Returns:
        The exit status: 0, or 2 after a one-line error.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            cmd_split(parse_split_args(argv))
    except MDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
