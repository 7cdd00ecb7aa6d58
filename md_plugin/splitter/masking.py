"""Masked forward: a copy of the traced model with a 0/1 channel multiply at every mask site.

The multiplies are inserted into the fx graph rather than registered as forward hooks because
a module may run twice per forward with different channel spaces (the CIFAR ResNet block calls
one ReLU module for both its inner and its output activation); a graph node is unambiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .groups import SplitGraph, clone_graph_module

__all__ = ["MaskedModel", "create_masked_model", "create_reading_model"]


class MaskedModel(nn.Module):
    """The strong model with per-group channel masks (all ones = the strong model).

    ``set_masks([bool[C_g] for each group])`` selects a module; ``forward`` returns all logits.
    """

    def __init__(self, sg: SplitGraph):
        super().__init__()
        gm = clone_graph_module(sg)
        for g in sg.groups:
            gm.register_buffer(f"split_mask_{g.index}", torch.ones(1, g.channels, 1, 1))
        by_name = {n.name: n for n in gm.graph.nodes}
        for g in sg.groups:
            for site in g.sites:
                node = by_name[site]
                with gm.graph.inserting_after(node):
                    attr = gm.graph.get_attr(f"split_mask_{g.index}")
                with gm.graph.inserting_after(attr):
                    mul = gm.graph.call_function(torch.mul, (node, attr))
                node.replace_all_uses_with(mul)
                mul.args = (node, attr)
        gm.graph.lint()
        gm.recompile()
        self.gm = gm
        self.num_groups = len(sg.groups)

    @torch.no_grad()
    def set_masks(self, masks: Sequence[torch.Tensor] | None) -> None:
        """One bool/0-1 vector per group; ``None`` restores the full model."""
        for i in range(self.num_groups):
            buf = getattr(self.gm, f"split_mask_{i}")
            if masks is None:
                buf.fill_(1.0)
            else:
                buf.copy_(masks[i].to(buf).view_as(buf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)


def create_masked_model(sg: SplitGraph, masks: Sequence[torch.Tensor] | None = None) -> MaskedModel:
    """A :class:`MaskedModel` in eval mode with ``masks`` applied."""
    m = MaskedModel(sg).eval()
    m.set_masks(masks)
    return m


def create_reading_model(sg: SplitGraph) -> fx.GraphModule:
    """A copy of the model that returns ``(logits, [per-group L1 [B, C_g]])``.

    Each group's vector is the sum over its read points (post-activation outputs) of the
    spatial L1 norm per channel: the importance measure of CNNSplitter (spec section 2), summed
    over the members of a coupled group.
    """
    gm = clone_graph_module(sg)
    by_name = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    per_group: list[fx.Node] = []
    sums: dict[str, fx.Node] = {}
    for g in sg.groups:  # reduce right after each read point (before any later in-place op)
        for r in g.reads:
            node = by_name[r]
            with gm.graph.inserting_after(node):
                a = gm.graph.call_method("abs", (node,))
            with gm.graph.inserting_after(a):
                sums[r] = gm.graph.call_method("sum", (a, (2, 3)))
    with gm.graph.inserting_before(out_node):
        for g in sg.groups:
            acc = None
            for r in g.reads:
                s = sums[r]
                acc = s if acc is None else gm.graph.call_function(torch.add, (acc, s))
            per_group.append(acc)
        logits = out_node.args[0]
        out_node.args = ((logits, per_group),)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()
