"""``modularize``: importance, layer sensitivity, search, calibration and measurement in one
call (the Python API).

Images: the held-out (validation) images of the split classes give the importance, the layer
sensitivity (a stratified subset), the GA's fitness (another stratified subset), the own-logit
ranges and every reported accuracy; they are the only images that select anything. Module
calibration (``calibration``, a deviation from the paper) fits BN statistics and per-channel
affines on *training* images of the split classes, never on the held-out ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, MDError
from .bank import ModuleBank
from .calibrate import CalibrationConfig, calibrate_modules
from .encoding import GeneLayout, create_gene_layout
from .gradinit import sensitivity_target
from .gradsearch import GradConfig, gradient_modules
from .groups import SplitGraph, create_split_graph
from .head import refit_heads
from .importance import compute_importance
from .modules import SplitModules, create_split_modules
from .search import ModuleEvaluator, SearchConfig, run_search
from .sensitivity import SensitivityTable, choose_init_ratios, layer_sensitivity

__all__ = [
    "SensitivityConfig",
    "collect_images",
    "modularize",
    "stratified_subset",
]

_logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SensitivityConfig:
    """``--init-ratios auto``: the layer sensitivity on a stratified subset of ``images``
    held-out images, each group's initial keep ratios chosen within ``tolerance`` points of the
    strong model (:func:`~md_plugin.splitter.sensitivity.choose_init_ratios`)."""

    images: int = 100
    tolerance: float = 2.0

    def validate(self, n_classes: int) -> None:
        if self.images < n_classes:
            raise ConfigError(
                f"--sensitivity-images must be at least the number of classes ({n_classes}), "
                f"got {self.images}"
            )
        if self.tolerance < 0:
            raise ConfigError(f"--sensitivity-tolerance must be >= 0, got {self.tolerance}")


@torch.no_grad()
def collect_images(
    loader: Iterable, classes: Sequence[int], what: str = "validation"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(images, labels)`` of ``classes`` from ``loader``, on the CPU."""
    cls = torch.tensor(list(classes))
    xs, ys = [], []
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1])
        keep = (y[:, None] == cls[None]).any(1)
        if keep.any():
            xs.append(x[keep].cpu())
            ys.append(y[keep].cpu())
    if not xs:
        raise MDError(f"the {what} data has no image of classes {list(classes)}")
    return torch.cat(xs), torch.cat(ys)


def stratified_subset(
    labels: torch.Tensor, classes: Sequence[int], total: int, seed: int
) -> np.ndarray:
    """Indices of ~``total`` images, an equal share per class (all of a class if it has fewer),
    drawn with ``seed``; sorted."""
    rng = np.random.default_rng(seed)
    share = [
        total // len(classes) + (1 if i < total % len(classes) else 0) for i in range(len(classes))
    ]
    out = []
    for c, k in zip(classes, share):
        idx = (labels == c).nonzero().flatten().numpy()
        out.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


def _num_outputs(model: nn.Module, sg) -> int:
    out = next(n for n in sg.gm.graph.nodes if n.op == "output")
    shape = sg.shapes.get(out.args[0].name) if hasattr(out.args[0], "name") else None
    if shape is None or len(shape) != 2:
        raise MDError("the model's output is not a [batch, classes] tensor of logits")
    return int(shape[1])


def _jsonable(v: Any) -> Any:
    """Tuples (also nested) as lists, as the artifact's JSON will hold them."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _check_classes(classes: Sequence[int] | None, n_out: int) -> list[int]:
    classes = list(range(n_out)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < n_out]
    if bad:
        raise ConfigError(f"class(es) {bad} out of range: the model has {n_out} outputs")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ConfigError(f"classes {twice} are listed more than once: give each class once")
    if len(classes) < 2:
        raise ConfigError(f"give at least two classes to split, got {classes}")
    return classes


def _sensitivity_stage(
    sg: SplitGraph,
    layout: GeneLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int],
    seed: int,
    batch_size: int,
    sens: SensitivityConfig,
    device: torch.device | str,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[list[list[float]], SensitivityTable]:
    """Layer sensitivity on a held-out subset; each group's initial keep ratios."""
    sub = stratified_subset(y, classes, sens.images, seed + 1)  # not the fitness subset
    row = {c: i for i, c in enumerate(classes)}
    rows = torch.tensor([row[int(v)] for v in y[sub]])
    bank = ModuleBank(sg).to(device)
    table = layer_sensitivity(bank, layout, x[sub], rows, classes, batch_size=min(50, batch_size),
                              log=log, progress=progress)  # fmt: skip
    ratios = choose_init_ratios(table, sens.tolerance)
    log(
        "init ratios (within "
        f"{sens.tolerance:g} points of the strong model's {table.strong_acc:.1f}%): "
        + ", ".join(
            f"{g.name} {'/'.join(f'{r:.1f}' for r in rs)}" for g, rs in zip(sg.groups, ratios)
        )
    )
    return ratios, table


def _importance_stage(
    sg: SplitGraph,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int],
    min_confidence: float,
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[Any, GeneLayout]:
    """Per-class channel importance on the held-out images, and the gene layout of its ranks."""
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    t0 = time.perf_counter()
    imp = compute_importance(sg, batches, classes, min_confidence, device, progress)
    log(
        f"importance: {len(x)} validation images, confident per class "
        f"{dict(zip(classes, imp.counts))}; {len(sg.groups)} channel groups "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    orders = [[imp.order(i, g) for g in range(len(sg.groups))] for i in range(len(classes))]
    return imp, create_gene_layout(sg.num_channels, orders)


def modularize(
    model: nn.Module,
    loader: Iterable,
    classes: Sequence[int] | None = None,
    config: SearchConfig | GradConfig | None = None,
    *,
    min_confidence: float = 0.9,
    init_ratios: str = "auto",
    sensitivity: SensitivityConfig | None = None,
    calibration: CalibrationConfig | None = None,
    train_loader: Iterable | None = None,
    state_path: str | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
    input_size: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> SplitModules:
    """Split ``model`` into one module per class of ``classes`` (its output indices; default all).

    Args:
        model: the strong model (not changed).
        loader: validation ``(images, labels)`` (eval transforms, labels in the model's output
            space; never the test set). Its images of ``classes`` are held in memory: all of
            them give the importance, the (min, max) ranges and the reported accuracies; a
            stratified ``config.val_images`` subset is the GA's fitness set and another
            ``sensitivity.images`` subset the layer sensitivity's.
        config: the GA's :class:`SearchConfig`; ``overrides`` set its fields (``generations=10``).
            A :class:`~.gradsearch.GradConfig` runs GradSplitter's gradient search instead: its
            masks and module heads learn on ``train_loader``'s images (all of them), a
            ``val_images`` subset of the held-out ones chooses the epoch; its ``mask_init='auto'``
            runs the importance and sensitivity stages for its kernel target.
        init_ratios: ``"auto"`` (each group's initial keep ratios from the layer sensitivity,
            :class:`SensitivityConfig`) or ``"fixed"`` (``config``'s forward-order lists).
        calibration: :class:`CalibrationConfig` (default: none); ``bn``/``affine`` need
            ``train_loader``: training images of the split classes (eval transforms).
        state_path: makes the search resumable.

    Returns:
        Bound, calibrated, measured :class:`SplitModules`; ``options['timings']`` holds each
        stage's seconds.
    """
    cfg = dataclasses.replace(config or SearchConfig(), **overrides)
    calibration = calibration or CalibrationConfig(mode="none")
    sens = sensitivity or SensitivityConfig()
    _check_settings(cfg, calibration, init_ratios, min_confidence, train_loader)
    log = log or _logger.info
    model = model.eval().to(device)
    sg = create_split_graph(model, input_size)
    classes = _check_classes(classes, _num_outputs(model, sg))
    if init_ratios == "auto":
        sens.validate(len(classes))
    timings = StageTimings()
    if isinstance(cfg, GradConfig):
        return _gradient_split(model, sg, loader, classes, cfg, calibration, train_loader, timings,
                               min_confidence, sens, state_path, device, progress, log)  # fmt: skip
    x, y = collect_images(loader, classes)
    batches = list(zip(x.split(cfg.batch_size), y.split(cfg.batch_size)))
    with timings.stage("importance"):
        imp, layout = _importance_stage(sg, x, y, classes, min_confidence, cfg.batch_size,
                                        device, progress, log)  # fmt: skip
    table = None
    if init_ratios == "auto":
        with timings.stage("sensitivity"):
            ratios, table = _sensitivity_stage(sg, layout, x, y, classes, cfg.seed, cfg.batch_size,
                                               sens, device, progress, log)  # fmt: skip
        cfg = dataclasses.replace(cfg, group_ratios=tuple(tuple(r) for r in ratios))
        log(f"sensitivity: {timings['sensitivity_s']:.0f} s")
    with timings.stage("search"):
        result = _search_stage(sg, layout, x, y, classes, cfg, state_path, device, progress, log)
    opts = dict(
        source="search",
        config=_jsonable(dataclasses.asdict(cfg)),
        min_confidence=min_confidence,
        importance_counts=imp.counts,
        best_generation=result.best_generation,
        history=result.history,
        genes=layout.num_genes,
        init_ratios=init_ratios,
    )
    if table is not None:
        opts["sensitivity"] = table.to_dict()
    mods = create_split_modules(model, sg, classes, result.masks, opts)
    return _calibrate_and_measure(mods, batches, calibration, train_loader, timings, device, log)


def _calibrate_and_measure(
    mods: SplitModules,
    batches: list,
    calibration: CalibrationConfig,
    train_loader: Iterable | None,
    timings: StageTimings,
    device: torch.device | str,
    log: Callable[[str], None],
) -> SplitModules:
    """The last stages of either search: calibration (if asked), then the measurement on the
    held-out ``batches``."""
    mods.options["calibration"] = dict(mode="none")
    if calibration.mode != "none":
        with timings.stage("calibration"):
            xt, yt = _training_images(train_loader, mods.classes, calibration)
            calibrate_modules(mods, xt, calibration, log)
            if mods.heads is not None:  # heads of the gradient search: fit to the new logits
                refit_heads(mods, xt, yt, log=log)
    with timings.stage("measure"):
        mods.measure(batches, device)
    mods.options["timings"] = dict(timings)
    return mods


def _gradient_split(
    model: nn.Module,
    sg: SplitGraph,
    loader: Iterable,
    classes: list[int],
    cfg: GradConfig,
    calibration: CalibrationConfig,
    train_loader: Iterable | None,
    timings: StageTimings,
    min_confidence: float,
    sens: SensitivityConfig,
    state_path: str | None,
    device: torch.device | str,
    progress: bool,
    log: Callable[[str], None],
) -> SplitModules:
    """``modularize`` with the gradient search (:mod:`.gradsearch`) instead of the GA. With
    ``mask_init='auto'`` the layer sensitivity sets the kernel target: the fraction its keep
    ratios leave (:func:`~.gradinit.sensitivity_target`), unless ``target_kernels`` is given."""
    if train_loader is None:
        raise ConfigError("the gradient search learns on training images: pass train_loader")
    x, y = collect_images(loader, classes)
    bs = cfg.eval_batch_size
    table = None
    if cfg.mask_init == "auto":
        with timings.stage("importance"):
            _, layout = _importance_stage(sg, x, y, classes, min_confidence, bs, device,
                                          progress, log)  # fmt: skip
        with timings.stage("sensitivity"):
            ratios, table = _sensitivity_stage(sg, layout, x, y, classes, cfg.seed, bs, sens,
                                               device, progress, log)  # fmt: skip
        t = sensitivity_target(sg, [r[0] for r in ratios])
        if cfg.target_kernels is None:
            cfg = dataclasses.replace(cfg, target_kernels=round(t, 4))
        log(f"sensitivity: {timings['sensitivity_s']:.0f} s; its ratios keep {100 * t:.1f}% of "
            f"the kernels; kernel target {100 * cfg.target_kernels:.1f}%, masks start at ones")  # fmt: skip
    with timings.stage("search"):
        sub = stratified_subset(y, classes, cfg.val_images, cfg.seed)
        mods = gradient_modules(model, sg, classes, x, y, sub, train_loader, cfg,
                                state_path=state_path, progress=progress, log=log, device=device,
                                min_confidence=min_confidence)  # fmt: skip
    mods.options["init_ratios"] = "auto" if table is not None else cfg.mask_init
    if table is not None:
        mods.options["sensitivity"] = table.to_dict()
    batches = list(zip(x.split(bs), y.split(bs)))
    return _calibrate_and_measure(mods, batches, calibration, train_loader, timings, device, log)


class StageTimings(dict):
    """``{stage}_s`` wall seconds and ``{stage}_cpu_s`` CPU seconds of this process (all its
    threads: with one thread, the cost on an idle core, whatever the machine's load)."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self[f"{name}_s"] = time.perf_counter() - wall
            self[f"{name}_cpu_s"] = time.process_time() - cpu


def _check_settings(
    cfg: SearchConfig,
    calibration: CalibrationConfig,
    init_ratios: str,
    min_confidence: float,
    train_loader: Iterable | None,
) -> None:
    cfg.validate()
    calibration.validate()
    if init_ratios not in ("auto", "fixed"):
        raise ConfigError(f"init_ratios must be 'auto' or 'fixed', got {init_ratios!r}")
    if isinstance(cfg, GradConfig) and cfg.mask_init == "auto" and init_ratios != "auto":
        raise ConfigError(
            "the gradient search starts from the layer sensitivity (--init-ratios auto) or from "
            "--mask-init ones|importance; numeric --init-ratios are the GA's forward-order rule"
        )
    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1], got {min_confidence}")
    if calibration.mode != "none" and train_loader is None:
        raise ConfigError(
            f"--calibrate {calibration.mode} needs training images of the split classes"
        )


def _search_stage(
    sg: SplitGraph,
    layout: GeneLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int],
    cfg: SearchConfig,
    state_path: str | None,
    device: torch.device | str,
    progress: bool,
    log: Callable[[str], None],
):
    """The GA on a stratified ``cfg.val_images`` subset of the held-out images."""
    sub = stratified_subset(y, classes, cfg.val_images, cfg.seed)
    row = {c: i for i, c in enumerate(classes)}
    y_rows = np.array([row[int(v)] for v in y[sub]])
    evaluator = ModuleEvaluator(sg, x[sub], classes, cfg.eval_mode, cfg.batch_size, device)
    log(
        f"search: {len(classes)} classes x population {cfg.population} x {cfg.generations} "
        f"generations, {layout.num_genes} genes, {len(sub)} val images"
    )
    return run_search(layout, evaluator, y_rows, cfg, state_path, progress, log)


def _training_images(
    loader: Iterable, classes: list[int], cfg: CalibrationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified, seeded subset of ``cfg.images`` training images of ``classes``."""
    x, y = collect_images(loader, classes, "training")
    if len(x) > cfg.images:
        sub = stratified_subset(y, classes, cfg.images, cfg.seed)
        x, y = x[sub], y[sub]
    return x, y
