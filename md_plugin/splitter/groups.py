"""Coupled channel groups of a CNN, found by tracing its forward graph.

CNNSplitter removes convolution kernels per class. In a plain CNN every conv's output channels
can be chosen freely; elsewhere channels are *coupled*: a residual add ties the stem, the
downsample conv and every block output of a stage to one channel space, a depthwise conv keeps
its input's channels, a squeeze-excitation gate is tied to the channels it scales. Each coupled
set is one :class:`ChannelGroup` with one importance vector and one gene block, so a module is
always a real narrower network.

We trace the model with ``torch.fx`` (timm's no-trace modules and its plain Linear stay leaves)
and send every node to the handler of its kind, chosen from a table (:mod:`.handlers`: conv,
grouped conv, BN, activation, pass-through, option-A shortcut, head, add, multiply,
concatenation). The handlers give every tensor a channel layout (the groups it holds, side by
side), merge spaces at adds and multiplies (union-find) and refuse any op they cannot reason
about: a clear one-line error, never a silently wrong module. Mask sites are the BatchNorm
outputs (or a conv output no BN follows); activations keep a removed channel at zero when
act(0) = 0, and one with act(0) != 0 (an SE gate) may only scale channels that are zero, so
masking equals physical removal (tested per family). Importance is read at the activations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..layers.select import _example_input
from .handlers import Trace, UnsupportedArchitecture, is_shortcut_a, on_node

__all__ = ["ChannelGroup", "SplitGraph", "create_split_graph", "UnsupportedArchitecture"]


@dataclass
class ChannelGroup:
    """Channels shared by one or more convolutions; one importance vector and one gene block.

    ``producers``: convs whose output channels are these channels (all sliced together on
    extraction; a depthwise or grouped conv that keeps its input's channels is not listed).
    ``sites``: graph nodes after which the 0/1 mask is applied. A site node may hold several
    groups side by side (a DenseNet BN after a concatenation): the group's channels are then
    the slice :meth:`SplitGraph.segments` gives; otherwise they are all of the node's channels.
    ``reads``: nodes (post-activation) whose per-channel L1 norm is the importance, laid out
    the same way. ``unit``: channels kept or removed together (the channels per conv group of a
    grouped conv, 1 otherwise); ``channels`` counts units, so a mask has ``channels`` entries
    and :meth:`expand` turns it into ``width`` per-channel entries.
    """

    index: int
    name: str
    channels: int
    producers: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    unit: int = 1

    @property
    def width(self) -> int:
        """Channels in the network (``channels * unit``)."""
        return self.channels * self.unit

    @property
    def kernels(self) -> int:
        """Kernels this group removes per mask entry (one per producer conv and channel)."""
        return max(1, len(self.producers)) * self.unit

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-unit mask [channels] as a per-channel mask [width]."""
        return mask if self.unit == 1 else mask.repeat_interleave(self.unit, dim=-1)


@dataclass
class SplitGraph:
    """A traced model with its channel groups and, per node, the groups of its channels.

    ``layouts[node]``: the group indices of a tensor node's channels, side by side along dim 1
    (one for most nodes, several after a concatenation; a group may appear twice, e.g. DLA
    concatenates a block's input and output, which an add has made one group), or ``(INPUT,)`` / ``(HEAD,)`` for the
    image and the head (constants of :mod:`.handlers`). ``node_group``: the same for the nodes
    that hold exactly one group (or INPUT / HEAD); a concatenation's nodes are not in it.
    """

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    node_group: dict[str, int]  # node name -> group index (or INPUT / HEAD)
    shapes: dict[str, tuple[int, ...]]
    shortcuts: dict[str, tuple[int, int, int]]  # ShortcutA-like node -> (in group, out group, off)
    input_size: tuple[int, ...]
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_channels(self) -> list[int]:
        return [g.channels for g in self.groups]

    @property
    def total_kernels(self) -> int:
        return sum(g.channels * g.kernels for g in self.groups)

    def segments(self, node: str) -> list[tuple[int, int, int]]:
        """``(group, first channel, width)`` of each group in ``node``'s channels; [] for the
        image and the head."""
        out, start = [], 0
        for gi in self.layouts[node]:
            if gi < 0:
                return []
            out.append((gi, start, self.groups[gi].width))
            start += self.groups[gi].width
        return out

    def channel_index(self, node: str, keep: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Positions in ``node``'s channels that ``keep`` (per group, kept channel indices in
        the group's width) keeps; None for the image and the head."""
        segs = self.segments(node)
        if not segs:
            return None
        return torch.cat([keep[gi] + start for gi, start, _ in segs])


def _leaf_types() -> tuple[tuple[type, ...], tuple]:
    """timm's no-trace modules and functions (none for a timm without them)."""
    try:
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - older timm
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


# subclasses that compute exactly what their torch base computes (timm's Linear would otherwise
# be traced into F.linear on a parameter); others, e.g. a weight-standardised conv whose
# statistics run over its input channels, are traced into and refused where they read weights
_WHOLE = {"Linear": nn.Linear, "Conv2dSame": nn.Conv2d}


class _Tracer(fx.Tracer):
    """fx tracer that keeps timm's untraceable modules, the subclasses in ``_WHOLE`` and our
    parameter-free shortcuts whole."""

    def __init__(self) -> None:
        self._leaf_types, funcs = _leaf_types()
        super().__init__(autowrap_functions=funcs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        base = _WHOLE.get(type(m).__name__)
        if isinstance(m, self._leaf_types) or is_shortcut_a(m) or (base and isinstance(m, base)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, input_size: Sequence[int] | None):
    """(graph module, node shapes, example input) of ``model``; one line if fx cannot trace it."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for data-dependent code
        raise UnsupportedArchitecture(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the splitter needs a traceable CNN"
        ) from None
    gm = fx.GraphModule(model, graph)
    x = _example_input(model, input_size)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            try:  # a plain run first: ShapeProp prints a traceback before it raises
                gm(x)
            except RuntimeError as e:
                raise UnsupportedArchitecture(
                    f"the example input {tuple(x.shape[1:])} does not run through "
                    f"{type(model).__name__} ({str(e).splitlines()[0] if str(e) else e!r}); "
                    "give another input size"
                ) from None
            ShapeProp(gm).propagate(x)
    finally:
        gm.train(was_training)
    shapes: dict[str, tuple[int, ...]] = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            shapes[n.name] = tuple(tm.shape)
    return gm, shapes, x


def _merge_spaces(tr: Trace) -> tuple[list[ChannelGroup], dict[int, int]]:
    """One group per merged space, in forward order of its first member; (groups, root ->
    group index). Widths must agree and be a multiple of the group's unit."""
    roots: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    for sid in range(len(tr.uf.parent)):
        r = tr.uf.find(sid)
        if r not in roots:
            roots[r] = len(groups)
            groups.append(ChannelGroup(len(groups), "", tr.widths[sid]))
        g = groups[roots[r]]
        if tr.widths[sid] != g.channels:
            raise UnsupportedArchitecture(
                f"{tr.model_name}: an add joins {tr.widths[sid]} and {g.channels} channels"
            )
        g.producers.extend(tr.producers.get(sid, []))
        g.unit = math.lcm(g.unit, tr.units.get(sid, 1))
    for g in groups:
        if not g.producers:
            raise UnsupportedArchitecture(f"{tr.model_name}: a channel group has no convolution")
        g.name = g.producers[0] + (f"+{len(g.producers) - 1}" if len(g.producers) > 1 else "")
        if g.channels % g.unit:
            raise UnsupportedArchitecture(
                f"{tr.model_name}: group {g.name!r} has {g.channels} channels, not a multiple "
                f"of its grouped convs' {g.unit} channels per group"
            )
        g.channels //= g.unit
    return groups, roots


def _collect_groups(tr: Trace):
    """Merged spaces -> groups; (groups, layouts, shortcuts) in group indices."""
    groups, roots = _merge_spaces(tr)

    def group_of(sid: int) -> int:
        return roots[tr.uf.find(sid)] if sid >= 0 else sid

    layouts = {n: tuple(group_of(s) for s in lay) for n, lay in tr.layout.items()}
    for points, attr in ((tr.sites, "sites"), (tr.reads, "reads")):
        for n, lay in points:
            for s in lay:
                names = getattr(groups[group_of(s)], attr)
                if n not in names:
                    names.append(n)
    for g in groups:
        if not g.reads:
            g.reads = list(g.sites)
    shortcuts = {n: (group_of(a), group_of(b), off) for n, (a, b, off) in tr.shortcuts.items()}
    return groups, layouts, shortcuts


def create_split_graph(model: nn.Module, input_size: Sequence[int] | None = None) -> SplitGraph:
    """Trace ``model`` and find its coupled channel groups (in forward order).

    Every node goes to the handler of its kind (:mod:`.handlers`), which gives its output a
    channel layout.

    Args:
        model: the CNN (it is traced, not changed).
        input_size: ``(C, H, W)`` of the example input (default: the model's pretrained cfg).

    Returns:
        The :class:`SplitGraph`.

    Raises:
        UnsupportedArchitecture: a one-line user error for anything that cannot be split
            correctly: a grouped conv with unequal input and output widths per group, unknown
            channel-mixing ops, a conv module called twice, a layer that mixes channels after
            an activation with act(0) != 0 that is not an SE gate, ...
    """
    gm, shapes, x = _trace(model, input_size)
    tr = Trace(gm, type(model).__name__, shapes)
    for node in gm.graph.nodes:
        on_node(tr, node)
    groups, layouts, shortcuts = _collect_groups(tr)
    if not groups:
        raise UnsupportedArchitecture(f"{tr.model_name}: no convolution to split")
    node_group = {n: lay[0] for n, lay in layouts.items() if len(lay) == 1}
    return SplitGraph(gm, groups, node_group, shapes, shortcuts, tuple(x.shape[1:]), layouts)


def clone_graph_module(sg: SplitGraph) -> fx.GraphModule:
    """An independent copy of the traced model (parameters included)."""
    return copy.deepcopy(sg.gm)
