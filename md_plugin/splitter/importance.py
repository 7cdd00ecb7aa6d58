"""Per-class kernel importance (CNNSplitter spec section 2), in one batched pass.

I[c][g][k] = mean over class-c images the strong model classifies with softmax(c) >= the
confidence floor of the spatial L1 norm of channel k at the post-activation outputs of group g
(summed over the group's members). The original code runs batch size 1; eval-mode BatchNorm
makes a batch of images independent, so batching changes nothing but speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import MDError
from .groups import SplitGraph
from .masking import create_reading_model

__all__ = ["Importance", "compute_importance"]


@dataclass
class Importance:
    """``scores[i][g]``: importance [C_g] of group g for ``classes[i]``; ``counts[i]`` images."""

    classes: list[int]
    scores: list[list[torch.Tensor]]
    counts: list[int]

    def order(self, i: int, g: int) -> torch.Tensor:
        """Channels of group g, most important first for class ``classes[i]`` (stable ties)."""
        return torch.argsort(-self.scores[i][g], stable=True)


@torch.no_grad()
def compute_importance(
    sg: SplitGraph,
    loader: Iterable,
    classes: Sequence[int],
    min_confidence: float = 0.9,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Importance:
    """Importance of every group's channels for each class in ``classes`` (model output indices).

    ``loader`` yields ``(images, labels, ...)`` with labels in the model's output space; use
    validation images (the spec's choice), never the test set. Images of other classes are
    skipped. A class with no confident image gets a clear error.
    """
    classes = [int(c) for c in classes]
    pos = {c: i for i, c in enumerate(classes)}
    rm = create_reading_model(sg).to(device)
    sums = [[torch.zeros(g.channels, dtype=torch.float64) for g in sg.groups] for _ in classes]
    counts = [0] * len(classes)
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="importance", leave=False, dynamic_ncols=True)
    for batch in it:
        x, y = batch[0].to(device), batch[1].to(device)
        logits, reads = rm(x)
        if logits.shape[1] <= max(classes):
            raise MDError(
                f"class {max(classes)} is out of range: the model has {logits.shape[1]} outputs"
            )
        conf = logits.float().softmax(1).gather(1, y.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
        for c in y.unique().tolist():
            if c not in pos:
                continue
            sel = (y == c) & (conf >= min_confidence)
            n = int(sel.sum())
            if n == 0:
                continue
            i = pos[c]
            counts[i] += n
            for g, r in enumerate(reads):
                sums[i][g] += r[sel].double().sum(0).cpu()
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise MDError(
            f"class(es) {empty} have no image with softmax >= {min_confidence} in the importance "
            "data; lower --min-confidence or check the class map"
        )
    scores = [[(s / n).float() for s in per] for per, n in zip(sums, counts)]
    return Importance(classes, scores, counts)
