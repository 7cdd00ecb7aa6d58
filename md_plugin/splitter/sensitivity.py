"""Layer sensitivity (spec section 3), automated: which groups a module cannot thin.

For every coupled group g and keep ratio r: every class's module keeps only group g's top-r
channels by that class's importance (the first floor(G*r) gene blocks of its importance order,
as the GA's encoding cuts them; at least one channel) and every other group whole; the modules
are composed (argmax of own-class logits) on held-out images and the accuracy recorded. All
modules of many (g, r) settings run as one batch through the
:class:`~md_plugin.splitter.bank.ModuleBank`, forward only.

The original code logs the curves and a human picks the "sensitive" layers; here a rule picks
each group's initial keep ratios (:func:`choose_init_ratios`), so ``--init-ratios auto`` needs
no hand step. Sensitivity only sets the GA's initialisation, never a constraint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import ConfigError
from .bank import ModuleBank
from .encoding import GeneLayout

__all__ = [
    "SENSITIVITY_RATIOS",
    "SensitivityTable",
    "choose_init_ratios",
    "layer_sensitivity",
    "plot_sensitivity",
]

SENSITIVITY_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))


@dataclass
class SensitivityTable:
    """``acc[g][k]``: composed accuracy (%) with only group g pruned to ``ratios[k]``;
    ``kernels[g]``: the kernels group g holds (% of the model's)."""

    groups: list[str]
    ratios: list[float]
    acc: list[list[float]]
    strong_acc: float
    images: int
    kernels: list[float] = field(default_factory=list)
    init_ratios: list[list[float]] = field(default_factory=list)
    tolerance: float | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One CSV row per group: its name, kernel share, accuracy per ratio, chosen ratios."""
        out = []
        for g, name in enumerate(self.groups):
            row: dict[str, Any] = dict(group=name)
            if self.kernels:
                row["kernels_pct"] = round(self.kernels[g], 3)
            for r, a in zip(self.ratios, self.acc[g]):
                row[f"acc_r{r:.1f}"] = round(a, 3)
            if self.init_ratios:
                row["init_ratios"] = " ".join(f"{r:.1f}" for r in self.init_ratios[g])
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(groups=self.groups, ratios=self.ratios, acc=self.acc,
                    strong_acc=self.strong_acc, images=self.images, kernels=self.kernels,
                    init_ratios=self.init_ratios, tolerance=self.tolerance)  # fmt: skip


def _top_blocks_mask(layout: GeneLayout, i: int, g: int, ratio: float) -> torch.Tensor:
    """Group g's channels kept by class ``i`` at ``ratio``: its first floor(G * ratio) blocks."""
    n = int(math.floor(layout.genes[g] * ratio + 1e-9))
    m = torch.zeros(layout.channels[g], dtype=torch.bool)
    for block in layout.blocks(i, g)[:n]:
        m[torch.from_numpy(block)] = True
    if not m.any():
        m[layout.orders[i][g][0]] = True
    return m


@torch.no_grad()
def layer_sensitivity(
    bank: ModuleBank,
    layout: GeneLayout,
    images: torch.Tensor,
    rows: torch.Tensor | np.ndarray,
    classes: Sequence[int],
    ratios: Sequence[float] = SENSITIVITY_RATIOS,
    batch_size: int = 50,
    module_images: int = 1000,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> SensitivityTable:
    """Composed accuracy for every (group, ratio); see the module docstring.

    Args:
        bank: the strong model's :class:`ModuleBank`.
        layout: gene layout with every class's importance order (row i = ``classes[i]``).
        images: held-out images [V, ...]; ``rows`` [V] their class row (0..N-1).
        ratios: keep ratios; 1.0 is the strong model and is not run.
        batch_size: images per forward; ``module_images`` bounds modules x images per forward.
    """
    n = len(classes)
    rows = torch.as_tensor(np.asarray(rows))
    cols = torch.as_tensor(list(classes), device=bank.device)
    ones = torch.ones(bank.mask_size, device=bank.device)
    offs = np.cumsum([0, *layout.channels])
    low = [r for r in ratios if r < 1.0]
    per_group = []  # [len(low) * n, K] masks of each group's settings (ratio-major)
    for g in range(len(layout.channels)):
        masks = []
        for r in low:
            for i in range(n):
                m = ones.clone()
                m[offs[g] : offs[g + 1]] = _top_blocks_mask(layout, i, g, r).float()
                masks.append(m)
        per_group.append(torch.stack(masks) if masks else ones[None, :0])
    hits = torch.zeros(len(layout.channels), len(low), dtype=torch.long)
    strong_hits = 0
    chunk = max(1, module_images // max(1, min(batch_size, len(images))) // n)  # ratios per run
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = math.ceil(len(images) / batch_size) * len(per_group)
        bar = tqdm(total=total, desc="sensitivity", leave=False, dynamic_ncols=True)
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(bank.device)
        y = rows[s : s + batch_size]
        full = bank(x, ones[None])[0][:, cols].argmax(1).cpu()
        strong_hits += int((full == y).sum())
        for g, masks in enumerate(per_group):
            prefix = bank.strong_prefix(x, g)  # the part before the group is the strong model's
            for c in range(0, len(low), chunk):
                k = min(chunk, len(low) - c)
                logits = bank(x, masks[c * n : (c + k) * n], prefix=prefix)  # [k*n, B, out]
                own = logits[:, :, cols].reshape(k, n, len(x), n).diagonal(dim1=1, dim2=3)
                hits[g, c : c + k] += (own.argmax(2).cpu() == y[None]).sum(1)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    v = len(images)
    strong = 100.0 * strong_hits / v
    acc = []
    for g in range(len(layout.channels)):
        it = iter(hits[g].tolist())
        acc.append([strong if r >= 1.0 else 100.0 * next(it) / v for r in ratios])
    if log is not None:
        log(f"sensitivity: {hits.numel()} (group, ratio) settings x {n} modules on {v} "
            f"held-out images (strong {strong:.2f}%)")  # fmt: skip
    total = sum(g.channels * g.kernels for g in bank.groups)
    kernels = [100.0 * g.channels * g.kernels / total for g in bank.groups]
    return SensitivityTable([g.name for g in bank.groups], list(ratios), acc, strong, v, kernels)


def choose_init_ratios(
    table: SensitivityTable, tolerance: float, step: float = 0.1
) -> list[list[float]]:
    """Each group's initial keep ratios from its curve.

    Rule: r*_g is the smallest ratio from which on (it and every larger ratio) the composed
    accuracy with only group g pruned stays within ``tolerance`` points of the strong model's;
    the group's list is ``[r*_g, r*_g + step]`` (capped at 1.0; ``[1.0]`` when no ratio below 1
    qualifies). So insensitive groups start thin, sensitive ones nearly whole, and the second
    value gives the GA some room above the knee. Stores the result in the table.
    """
    if tolerance < 0:
        raise ConfigError(f"--sensitivity-tolerance must be >= 0, got {tolerance}")
    out = []
    floor = table.strong_acc - tolerance
    for curve in table.acc:
        best = 1.0
        for r, a in sorted(zip(table.ratios, curve), reverse=True):
            if a < floor - 1e-9:
                break
            best = r
        hi = round(min(1.0, best + step), 4)
        out.append([best] if hi == best else [best, hi])
    table.init_ratios, table.tolerance = out, float(tolerance)
    return out


def plot_sensitivity(table: SensitivityTable, path: str | Path | BinaryIO) -> str | Path | BinaryIO:
    """Composed accuracy vs keep ratio, one line per group, the strong model dashed.

    ``path`` may be an open binary file (what :func:`md_plugin.files.atomic_write` passes).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # the OO API renders through Agg: no backend needed

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    n = len(table.groups)
    for g, name in enumerate(table.groups):
        colour = cmap(g / max(1, n - 1))
        label = name if not table.kernels else f"{name} ({table.kernels[g]:.0f}% kernels)"
        ax.plot(table.ratios, table.acc[g], marker="o", ms=3, lw=1.2, color=colour, label=label)
    ax.axhline(table.strong_acc, color="black", ls="--", lw=1, label="strong model")
    if table.tolerance is not None:
        ax.axhline(table.strong_acc - table.tolerance, color="grey", ls=":", lw=1,
                   label=f"tolerance ({table.tolerance:g} points)")  # fmt: skip
    ax.set_xlabel("keep ratio r of the pruned group (every class)")
    ax.set_ylabel("composed accuracy (%)")
    ax.set_title(f"Layer sensitivity ({table.images} held-out images)")
    ax.set_xlim(0.05, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if n > 10 else 1, loc="lower right")
    if isinstance(path, (str, Path)):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path
