"""Gene layout: importance-ordered channel blocks, one bit each (spec section 4, encoding).

Each group's channels, sorted by a class's importance, are split into G contiguous blocks
(``numpy.array_split``): G = 10 below 256 channels, else 100, and never more than the channel
count. Bit i keeps the i-th most important block. A group with no bit on keeps its most
important channel (the original keeps kernel 0), so a module is never disconnected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GeneLayout", "create_gene_layout", "genes_per_group"]


def genes_per_group(channels: int, small: int = 10, large: int = 100, wide: int = 256) -> int:
    return min(channels, small if channels < wide else large)


@dataclass
class GeneLayout:
    """Where each group's bits live and, per class, which channels each bit keeps."""

    channels: list[int]
    genes: list[int]
    orders: list[list[torch.Tensor]]  # [class][group] channel order, most important first

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.genes).tolist()]

    @property
    def num_genes(self) -> int:
        return int(sum(self.genes))

    def blocks(self, i: int, g: int) -> list[np.ndarray]:
        return np.array_split(self.orders[i][g].numpy(), self.genes[g])

    def decode(self, i: int, bits: np.ndarray) -> list[torch.Tensor]:
        """Per-group bool channel masks of class ``i``'s solution ``bits``."""
        off = self.offsets
        masks = []
        for g, c in enumerate(self.channels):
            m = torch.zeros(c, dtype=torch.bool)
            b = bits[off[g] : off[g + 1]]
            for on, block in zip(b, self.blocks(i, g)):
                if on:
                    m[torch.from_numpy(block)] = True
            if not m.any():
                m[self.orders[i][g][0]] = True
            masks.append(m)
        return masks

    def decode_flat(self, i: int, bits: np.ndarray) -> torch.Tensor:
        return torch.cat(self.decode(i, bits))


def create_gene_layout(
    channels: Sequence[int], orders: Sequence[Sequence[torch.Tensor]]
) -> GeneLayout:
    """Layout for groups of ``channels`` with per-class importance ``orders``."""
    genes = [genes_per_group(c) for c in channels]
    return GeneLayout(list(channels), genes, [list(o) for o in orders])
