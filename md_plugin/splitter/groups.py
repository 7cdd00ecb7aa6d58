"""Coupled channel groups of a CNN, found by tracing its forward graph.

CNNSplitter removes convolution kernels per class. In a plain CNN every conv's output channels
can be chosen freely; elsewhere channels are *coupled*: a residual add ties the stem, the
downsample conv and every block output of a stage to one channel space, and a depthwise conv
keeps its input's channels. Each coupled set is one :class:`ChannelGroup` with one importance
vector and one gene block, so a module is always a real narrower network.

We trace the model with ``torch.fx`` (timm's no-trace modules stay leaves), assign every tensor
a channel space, merge spaces at adds (union-find) and refuse any op we cannot reason about
(concatenation, grouped convs, channel-mixing functions): a clear one-line error, never a
silently wrong module. Mask sites are the BatchNorm outputs (or the conv output when no BN
follows); since every activation used has act(0) = 0 (checked), masking there equals masking
after the activation and equals physical removal. Importance is read at the activations.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import MDError
from ..layers.select import _example_input

__all__ = ["ChannelGroup", "SplitGraph", "create_split_graph", "UnsupportedArchitecture"]


class UnsupportedArchitecture(MDError):
    """The model has a channel coupling the splitter cannot handle correctly."""


_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish, nn.Mish, nn.ELU, nn.Tanh,
)  # fmt: skip
_ACT_FUNCS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.hardswish, torch.tanh}
_ACT_METHODS = {"relu", "relu_"}
_PASS_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
    nn.Dropout2d, nn.Identity, nn.Flatten,
)  # fmt: skip
_PASS_NAMES = {"SelectAdaptivePool2d", "DropPath", "DropBlock2d"}  # timm's, per-channel at eval
_PASS_FUNCS = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
    torch.flatten,
}  # fmt: skip
_PASS_METHODS = {"flatten", "contiguous", "mean", "amax", "view", "reshape"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_INPUT = -1  # channel space of the image (never maskable)
_HEAD = -2  # after the first channel-mixing layer of the head (never maskable)


@dataclass
class ChannelGroup:
    """Channels shared by one or more convolutions; one importance vector and one gene block.

    ``producers``: modules whose output channels are these channels (all sliced together on
    extraction). ``sites``: graph nodes after which the 0/1 mask is applied. ``reads``: nodes
    (post-activation) whose per-channel L1 norm is the importance.
    """

    index: int
    name: str
    channels: int
    producers: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        """Kernels this group removes per kept channel (one per producer conv)."""
        return max(1, len(self.producers))


@dataclass
class SplitGraph:
    """A traced model with its channel groups and, per node, the group of its channels."""

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    node_group: dict[str, int]  # node name -> group index (or _INPUT / _HEAD)
    shapes: dict[str, tuple[int, ...]]
    shortcuts: dict[str, tuple[int, int, int]]  # ShortcutA-like node -> (in group, out group, off)
    input_size: tuple[int, ...]

    @property
    def num_channels(self) -> list[int]:
        return [g.channels for g in self.groups]

    @property
    def total_kernels(self) -> int:
        return sum(g.channels * g.kernels for g in self.groups)


class _Tracer(fx.Tracer):
    """fx tracer that keeps timm's untraceable modules (and our parameter-free shortcuts) whole."""

    def __init__(self) -> None:
        try:
            from timm.layers._fx import get_notrace_functions, get_notrace_modules

            self._leaf_types = tuple(get_notrace_modules())
            funcs = tuple(get_notrace_functions())
        except ImportError:  # pragma: no cover - older timm
            self._leaf_types, funcs = (), ()
        super().__init__(autowrap_functions=funcs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or _is_shortcut_a(m):
            return True
        return super().is_leaf_module(m, qualname)


def _is_shortcut_a(m: nn.Module) -> bool:
    """md_plugin's option-A shortcut: subsample and zero-pad channels symmetrically."""
    return type(m).__name__ == "ShortcutA" and hasattr(m, "pad") and hasattr(m, "stride")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _act_zero_ok(fn, name: str) -> None:
    z = torch.zeros(1, 2, 2, 2)
    if not torch.equal(fn(z), z):
        raise UnsupportedArchitecture(
            f"activation {name!r} has act(0) != 0, so a channel mask is not kernel removal"
        )


def create_split_graph(model: nn.Module, input_size: Sequence[int] | None = None) -> SplitGraph:
    """Trace ``model`` and find its coupled channel groups (in forward order).

    Raises :class:`UnsupportedArchitecture` (a one-line user error) for anything that cannot be
    split correctly: concatenation, grouped (non-depthwise) convs, unknown channel-mixing ops, a
    conv module called twice, or an activation with act(0) != 0.
    """
    model_name = type(model).__name__
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for data-dependent code
        raise UnsupportedArchitecture(
            f"cannot trace {model_name} with torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the splitter needs a traceable CNN"
        ) from None
    gm = fx.GraphModule(model, graph)
    x = _example_input(model, input_size)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    finally:
        gm.train(was_training)
    modules = dict(gm.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            shapes[n.name] = tuple(tm.shape)

    uf = _UnionFind()
    space: dict[str, int] = {}  # node -> raw space id (or _INPUT/_HEAD)
    producers: dict[int, list[str]] = {}
    widths: dict[int, int] = {}
    sites: list[tuple[str, int]] = []
    reads: list[tuple[str, int]] = []
    raw_shortcuts: dict[str, tuple[int, int, int]] = {}
    called: set[str] = set()

    def fail(node: fx.Node, why: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(f"{model_name}: cannot split at {node.format_node()}: {why}")

    def tensor_args(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.name in space]

    def single_input(node: fx.Node) -> int:
        ins = tensor_args(node)
        if len(ins) != 1:
            raise fail(node, f"expected one tensor input, got {len(ins)}")
        return space[ins[0].name]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            space[node.name] = _INPUT
            continue
        if node.op == "output":
            continue
        if node.op == "get_attr":
            raise fail(node, "reads a parameter or buffer inside forward")
        shape = shapes.get(node.name)
        is_tensor = shape is not None
        if node.op == "call_module":
            m = modules[node.target]
            if any(True for _ in m.parameters(recurse=False)) or isinstance(m, nn.Conv2d):
                if node.target in called:
                    raise fail(node, "a module with parameters is called twice")
                called.add(node.target)
            src = single_input(node)
            if isinstance(m, nn.Conv2d) and src != _HEAD and not _in_head(node, shapes):
                if m.groups == 1:
                    sid = uf.new()
                    producers[sid] = [node.target]
                    widths[sid] = m.out_channels
                    space[node.name] = sid
                    if m.bias is not None or not _followed_by_bn(node, modules):
                        sites.append((node.name, sid))
                elif m.groups == m.in_channels == m.out_channels:
                    space[node.name] = src
                    if m.bias is not None:
                        sites.append((node.name, src))
                else:
                    raise fail(node, f"grouped convolution (groups={m.groups}) is not supported")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                space[node.name] = src
                if src >= 0:
                    sites.append((node.name, src))
                    act = getattr(m, "act", None)  # timm BatchNormAct2d
                    if act is not None and not isinstance(act, nn.Identity):
                        _act_zero_ok(act, node.target)
                        reads.append((node.name, src))
            elif isinstance(m, _ACT_MODULES):
                _act_zero_ok(m, node.target)
                space[node.name] = src
                if src >= 0:
                    reads.append((node.name, src))
            elif isinstance(m, _PASS_MODULES) or type(m).__name__ in _PASS_NAMES:
                if type(m).__name__ == "SelectAdaptivePool2d" and "cat" in str(
                    getattr(m, "pool_type", "")
                ):
                    raise fail(node, "concatenating pools are not supported")
                space[node.name] = src
            elif _is_shortcut_a(m):
                sid = uf.new()
                widths[sid] = shape[1]
                producers[sid] = []
                space[node.name] = sid
                raw_shortcuts[node.name] = (src, sid, int(m.pad) // 2)
                sites.append((node.name, sid))  # the shortcut carries kept input channels
            elif isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "ConvMlp":
                space[node.name] = _HEAD  # consumer: its input columns follow the input space
            else:
                if src >= 0:
                    raise fail(node, f"module type {type(m).__name__} is not supported")
                space[node.name] = src if src == _INPUT else _HEAD
        elif node.op in ("call_function", "call_method"):
            t = node.target
            ins = tensor_args(node)
            if not is_tensor or not ins:
                continue  # shape arithmetic etc.
            if t in _ADD_FUNCS or t in ("add", "add_"):
                spaces = [space[a.name] for a in ins]
                if len(ins) == 1:
                    raise fail(node, "add of a tensor and a constant changes act(0)")
                if any(s < 0 for s in spaces):
                    if all(s == _HEAD for s in spaces):
                        space[node.name] = _HEAD
                        continue
                    raise fail(node, "residual add with the input image or the head")
                for s in spaces[1:]:
                    uf.union(s, spaces[0])
                space[node.name] = spaces[0]
            elif t in _ACT_FUNCS or t in _ACT_METHODS:
                src = single_input(node)
                _act_zero_ok(
                    (lambda z, t=t: getattr(z, t)()) if isinstance(t, str) else t, str(node.name)
                )
                space[node.name] = src
                if src >= 0:
                    reads.append((node.name, src))
            elif t in _PASS_FUNCS or t in _PASS_METHODS:
                src = single_input(node)
                if t in ("view", "reshape") and src >= 0:
                    raise fail(node, "reshaping a feature map is not supported")
                space[node.name] = src
            else:
                srcs = [space[a.name] for a in ins]
                if all(s == _HEAD for s in srcs):
                    space[node.name] = _HEAD
                    continue
                raise fail(node, f"operation {getattr(t, '__name__', t)!r} is not supported")

    # groups in forward order of their first member
    roots: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    for sid in range(len(uf.parent)):
        r = uf.find(sid)
        if r not in roots:
            roots[r] = len(groups)
            groups.append(ChannelGroup(len(groups), "", widths[sid]))
        g = groups[roots[r]]
        if widths[sid] != g.channels:
            raise UnsupportedArchitecture(f"{model_name}: an add joins {widths[sid]} and "
                                          f"{g.channels} channels")  # fmt: skip
        g.producers.extend(producers.get(sid, []))
    node_group = {n: (roots[uf.find(s)] if s >= 0 else s) for n, s in space.items()}
    for n, sid in sites:
        groups[roots[uf.find(sid)]].sites.append(n)
    for n, sid in reads:
        groups[roots[uf.find(sid)]].reads.append(n)
    for g in groups:
        if not g.producers:
            raise UnsupportedArchitecture(f"{model_name}: a channel group has no convolution")
        g.name = g.producers[0] + (f"+{len(g.producers) - 1}" if len(g.producers) > 1 else "")
        if not g.reads:
            g.reads = list(g.sites)
    shortcuts = {
        n: (roots[uf.find(a)] if a >= 0 else a, roots[uf.find(b)], off)
        for n, (a, b, off) in raw_shortcuts.items()
    }
    if not groups:
        raise UnsupportedArchitecture(f"{model_name}: no convolution to split")
    return SplitGraph(gm, groups, node_group, shapes, shortcuts, tuple(x.shape[1:]))


def _in_head(node: fx.Node, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A conv acting as an FC (1x1 spatial input of a pooled map) belongs to the head."""
    shp = shapes.get(node.name)
    return shp is None or len(shp) != 4


def _followed_by_bn(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    users = list(node.users)
    return (
        len(users) == 1
        and users[0].op == "call_module"
        and isinstance(modules[users[0].target], nn.modules.batchnorm._BatchNorm)
    )


def clone_graph_module(sg: SplitGraph) -> fx.GraphModule:
    """An independent copy of the traced model (parameters included)."""
    return copy.deepcopy(sg.gm)
