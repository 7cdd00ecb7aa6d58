"""``modularize``: importance, search and measurement in one call (the Python API)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, MDError
from .encoding import create_gene_layout
from .groups import create_split_graph
from .importance import compute_importance
from .modules import SplitModules, create_split_modules
from .search import ModuleEvaluator, SearchConfig, run_search

__all__ = ["modularize", "collect_images", "stratified_subset"]

_logger = logging.getLogger(__name__)


@torch.no_grad()
def collect_images(loader: Iterable, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise MDError(f"the validation data has no image of classes {list(classes)}")
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


def modularize(
    model: nn.Module,
    loader: Iterable,
    classes: Sequence[int] | None = None,
    config: SearchConfig | None = None,
    *,
    min_confidence: float = 0.9,
    state_path: str | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
    input_size: Sequence[int] | None = None,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> SplitModules:
    """Split ``model`` into one module per class of ``classes`` (its output indices; default all).

    ``loader`` yields validation ``(images, labels)`` (eval transforms, labels in the model's
    output space; never the test set). Its images of ``classes`` are held in memory: all of
    them give the importance, the (min, max) ranges and the reported accuracies; a stratified
    ``config.val_images`` subset is the GA's fitness set. ``overrides`` set
    :class:`SearchConfig` fields (``generations=10``). ``state_path`` makes the search
    resumable. Returns bound, measured :class:`SplitModules`.
    """
    cfg = dataclasses.replace(config or SearchConfig(), **overrides)
    cfg.validate()
    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence must be in [0, 1], got {min_confidence}")
    log = log or _logger.info
    model = model.eval().to(device)
    sg = create_split_graph(model, input_size)
    n_out = _num_outputs(model, sg)
    classes = list(range(n_out)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < n_out]
    if bad:
        raise ConfigError(f"class(es) {bad} out of range: the model has {n_out} outputs")
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ConfigError(f"give at least two distinct classes to split, got {classes}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    x, y = collect_images(loader, classes)
    batches = [
        (x[s : s + cfg.batch_size], y[s : s + cfg.batch_size])
        for s in range(0, len(x), cfg.batch_size)
    ]
    imp = compute_importance(sg, batches, classes, min_confidence, device, progress)
    timings["importance_s"] = time.perf_counter() - t0
    log(
        f"importance: {len(x)} validation images, confident per class "
        f"{dict(zip(classes, imp.counts))}; {len(sg.groups)} channel groups"
    )
    orders = [[imp.order(i, g) for g in range(len(sg.groups))] for i in range(len(classes))]
    layout = create_gene_layout(sg.num_channels, orders)
    sub = stratified_subset(y, classes, cfg.val_images, cfg.seed)
    row = {c: i for i, c in enumerate(classes)}
    y_rows = np.array([row[int(v)] for v in y[sub]])
    evaluator = ModuleEvaluator(sg, x[sub], classes, cfg.eval_mode, cfg.batch_size, device)
    log(
        f"search: {len(classes)} classes x population {cfg.population} x {cfg.generations} "
        f"generations, {layout.num_genes} genes, {len(sub)} val images"
    )
    t0 = time.perf_counter()
    result = run_search(layout, evaluator, y_rows, cfg, state_path, progress, log)
    timings["search_s"] = time.perf_counter() - t0
    opts = dict(
        source="search",
        config={
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
        },
        min_confidence=min_confidence,
        importance_counts=imp.counts,
        best_generation=result.best_generation,
        history=result.history,
        genes=layout.num_genes,
    )
    mods = create_split_modules(model, sg, classes, result.masks, opts)
    t0 = time.perf_counter()
    mods.measure(list(zip(x.split(cfg.batch_size), y.split(cfg.batch_size))), device)
    timings["measure_s"] = time.perf_counter() - t0
    mods.options["timings"] = timings
    return mods
