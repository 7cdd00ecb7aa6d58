"""Where the gradient search starts: its mask initialisations and the kernel target.

The gradient search (:mod:`.gradsearch`) learns masks from starting values; this module holds
the choices of those values (``--mask-init``) apart from the search loop: GradSplitter's ones,
CNNSplitter's per-class importance ranks (:func:`importance_init`), and for ``auto`` the kernel
fraction the layer sensitivity's keep ratios leave (:func:`sensitivity_target`), which
:func:`~.split.modularize` sets as the search's ``target_kernels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .importance import compute_importance

__all__ = ["MASK_INITS", "importance_init", "sensitivity_target"]

# ones: GradSplitter's; auto: ones, with the kernel target the layer sensitivity's keep ratios
# leave (--init-ratios auto); importance: CNNSplitter's per-class importance ranks, all on
MASK_INITS = ("auto", "ones", "importance")


def importance_init(
    sg: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[int],
    min_confidence: float,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[M, K] starting values from CNNSplitter's per-class importance (not GradSplitter's): in
    every group the most important channel starts at 1 and the i-th of C at 1 - i / C, so under
    the kernel term the least important channels reach 0 first."""
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    imp = compute_importance(sg, batches, classes, min_confidence, device)
    rows = []
    for i in range(len(classes)):
        per = []
        for g, grp in enumerate(sg.groups):
            v = torch.empty(grp.channels)
            v[imp.order(i, g)] = (
                1.0 - torch.arange(grp.channels, dtype=torch.float32) / grp.channels
            )
            per.append(v)
        rows.append(torch.cat(per))
    return torch.stack(rows)


def sensitivity_target(sg: Any, ratios: Sequence[float]) -> float:
    """The fraction of the kernels that each group's keep ratio ``r_g`` leaves (at least one
    channel per group; a group channel counts once per producer conv, as
    :func:`~.gradsearch.kept_fraction`): ``--mask-init auto``'s kernel target."""
    kept = total = 0.0
    for grp, r in zip(sg.groups, ratios):
        c = grp.channels
        kept += max(1, int(round(r * c))) * grp.kernels
        total += c * grp.kernels
    return kept / total
