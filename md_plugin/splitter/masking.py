"""Masked forward: a copy of the traced model with a 0/1 channel multiply at every mask site.

The multiplies are inserted into the fx graph rather than registered as forward hooks because
a module may run twice per forward with different channel spaces (the CIFAR ResNet block calls
one ReLU module for both its inner and its output activation); a graph node is unambiguous.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .groups import SplitGraph, clone_graph_module

__all__ = ["MaskedModel", "create_masked_model", "create_reading_model", "insert_site_masks"]


class MaskedModel(nn.Module):
    """The strong model with per-group channel masks (all ones = the strong model).

    ``set_masks([bool[C_g] for each group])`` selects a module; ``forward`` returns all logits.
    """

    def __init__(self, sg: SplitGraph):
        super().__init__()
        gm = clone_graph_module(sg)
        for g in sg.groups:
            gm.register_buffer(f"split_mask_{g.index}", torch.ones(1, g.width, 1, 1))
        insert_site_masks(gm, sg, lambda i: f"split_mask_{i}")
        self.gm = gm
        self.num_groups = len(sg.groups)
        self.units = [g.unit for g in sg.groups]

    @torch.no_grad()
    def set_masks(self, masks: Sequence[torch.Tensor] | None) -> None:
        """One bool/0-1 vector per group (``channels`` entries, one per unit); ``None``
        restores the full model."""
        for i in range(self.num_groups):
            buf = getattr(self.gm, f"split_mask_{i}")
            if masks is None:
                buf.fill_(1.0)
            else:
                buf.copy_(masks[i].to(buf).repeat_interleave(self.units[i]).view_as(buf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)


def insert_site_masks(gm: fx.GraphModule, sg: SplitGraph, mask_attr: Callable[[int], str]) -> None:
    """Multiply every mask site of ``sg`` in ``gm`` (a copy of ``sg.gm``) by its mask.

    ``mask_attr(g)`` names an attribute of ``gm`` holding group g's per-channel mask
    ([..., width_g, 1, 1]); a site that holds several groups side by side (DenseNet's BN after
    a concatenation) is multiplied by their masks concatenated along dim 1 in its layout.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    for site in dict.fromkeys(s for g in sg.groups for s in g.sites):  # each node once
        node = last = by_name[site]
        parts = []
        for gi, _, _ in sg.segments(site):
            with gm.graph.inserting_after(last):
                last = gm.graph.get_attr(mask_attr(gi))
            parts.append(last)
        if len(parts) > 1:
            with gm.graph.inserting_after(last):
                last = gm.graph.call_function(torch.cat, (parts, 1))
        with gm.graph.inserting_after(last):
            mul = gm.graph.call_function(torch.mul, (node, last))
        node.replace_all_uses_with(mul)
        mul.args = (node, last)
    gm.graph.lint()
    gm.recompile()


def create_masked_model(sg: SplitGraph, masks: Sequence[torch.Tensor] | None = None) -> MaskedModel:
    """A :class:`MaskedModel` in eval mode with ``masks`` applied."""
    m = MaskedModel(sg).eval()
    m.set_masks(masks)
    return m


def create_reading_model(sg: SplitGraph) -> fx.GraphModule:
    """A copy of the model that returns ``(logits, [per-group L1 [B, C_g]])``.

    Each group's vector is the sum over its read points (post-activation outputs; a group's
    slice where a read point holds several groups) of the spatial L1 norm per channel: the
    importance measure of CNNSplitter (spec section 2), summed over the members of a coupled
    group, and over the channels of a unit.
    """
    gm = clone_graph_module(sg)
    by_name = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    sums: dict[str, fx.Node] = {}
    for r in dict.fromkeys(r for g in sg.groups for r in g.reads):
        node = by_name[r]  # reduce right after each read point (before any later in-place op)
        with gm.graph.inserting_after(node):
            a = gm.graph.call_method("abs", (node,))
        with gm.graph.inserting_after(a):
            sums[r] = gm.graph.call_method("sum", (a, (2, 3)))
    per_group: list[fx.Node] = []
    with gm.graph.inserting_before(out_node):
        for g in sg.groups:
            acc = None
            for r in g.reads:
                s = sums[r]
                segs = sg.segments(r)
                parts = [s]
                if len(segs) > 1:  # the group's slice(s) of a concatenation
                    parts = [
                        gm.graph.call_function(
                            operator.getitem, (s, (slice(None), slice(st, st + g.width)))
                        )
                        for gi, st, _ in segs
                        if gi == g.index
                    ]
                for part in parts:
                    acc = part if acc is None else gm.graph.call_function(torch.add, (acc, part))
            if g.unit > 1:  # one entry per unit
                acc = gm.graph.call_method("reshape", (acc, (-1, g.channels, g.unit)))
                acc = gm.graph.call_method("sum", (acc, -1))
            per_group.append(acc)
        logits = out_node.args[0]
        out_node.args = ((logits, per_group),)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()
