"""Coupled channel groups of a CNN, found by tracing its forward graph.

CNNSplitter removes convolution kernels per class. In a plain CNN every conv's output channels
can be chosen freely; elsewhere channels are *coupled*: a residual add ties the stem, the
downsample conv and every block output of a stage to one channel space, and a depthwise conv
keeps its input's channels. Each coupled set is one :class:`ChannelGroup` with one importance
vector and one gene block, so a module is always a real narrower network.

We trace the model with ``torch.fx`` (timm's no-trace modules stay leaves) and send every node
to the handler of its kind, chosen from a table (conv, BN, activation, pass-through, option-A
shortcut, head, add, ...). The handlers assign every tensor a channel space, merge spaces at
adds (union-find) and refuse any op we cannot reason about
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


class _Trace:
    """What one pass over the graph has learnt so far: every tensor node's (raw) channel space,
    the spaces' widths and producer convs, and the mask sites, read points and shortcuts.

    Raw spaces are union-find ids; an add merges them. The node handlers below fill this in,
    one node at a time in forward order.
    """

    def __init__(self, gm: fx.GraphModule, model_name: str, shapes: dict[str, tuple[int, ...]]):
        self.model_name = model_name
        self.modules = dict(gm.named_modules())
        self.shapes = shapes
        self.uf = _UnionFind()
        self.space: dict[str, int] = {}  # node -> raw space id (or _INPUT/_HEAD)
        self.producers: dict[int, list[str]] = {}
        self.widths: dict[int, int] = {}
        self.sites: list[tuple[str, int]] = []
        self.reads: list[tuple[str, int]] = []
        self.shortcuts: dict[str, tuple[int, int, int]] = {}
        self.called: set[str] = set()

    def fail(self, node: fx.Node, why: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(
            f"{self.model_name}: cannot split at {node.format_node()}: {why}"
        )

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.name in self.space]

    def single_input(self, node: fx.Node) -> int:
        ins = self.tensor_args(node)
        if len(ins) != 1:
            raise self.fail(node, f"expected one tensor input, got {len(ins)}")
        return self.space[ins[0].name]

    def new_space(self, width: int, producers: list[str]) -> int:
        sid = self.uf.new()
        self.widths[sid] = width
        self.producers[sid] = producers
        return sid

    def read(self, node: fx.Node, src: int) -> None:
        """``node`` is a post-activation output of ``src``: an importance read point."""
        if src >= 0:
            self.reads.append((node.name, src))


# -- handlers for call_module nodes: (trace, node, module, input space) ------------------------


def _on_conv(tr: _Trace, node: fx.Node, m: nn.Conv2d, src: int) -> None:
    """A conv opens a channel space; a depthwise conv keeps its input's; others are refused."""
    if src == _HEAD or _in_head(node, tr.shapes):
        return _on_head(tr, node, m, src)
    if m.groups == 1:
        sid = tr.new_space(m.out_channels, [node.target])
        tr.space[node.name] = sid
        if m.bias is not None or not _followed_by_bn(node, tr.modules):
            tr.sites.append((node.name, sid))
    elif m.groups == m.in_channels == m.out_channels:
        tr.space[node.name] = src
        if m.bias is not None:
            tr.sites.append((node.name, src))
    else:
        raise tr.fail(node, f"grouped convolution (groups={m.groups}) is not supported")


def _on_bn(tr: _Trace, node: fx.Node, m: nn.Module, src: int) -> None:
    """Mask after every BN (a mask before it is not removal: BN adds a bias)."""
    tr.space[node.name] = src
    if src >= 0:
        tr.sites.append((node.name, src))
        act = getattr(m, "act", None)  # timm BatchNormAct2d
        if act is not None and not isinstance(act, nn.Identity):
            _act_zero_ok(act, node.target)
            tr.read(node, src)


def _on_act_module(tr: _Trace, node: fx.Node, m: nn.Module, src: int) -> None:
    _act_zero_ok(m, node.target)
    tr.space[node.name] = src
    tr.read(node, src)


def _on_pass_module(tr: _Trace, node: fx.Node, m: nn.Module, src: int) -> None:
    """Per-channel modules (pools, dropout, flatten) keep their input's space."""
    if type(m).__name__ == "SelectAdaptivePool2d" and "cat" in str(getattr(m, "pool_type", "")):
        raise tr.fail(node, "concatenating pools are not supported")
    tr.space[node.name] = src


def _on_shortcut(tr: _Trace, node: fx.Node, m: nn.Module, src: int) -> None:
    """Option-A shortcut: a new space (the stage's) holding the input's channels at an offset."""
    sid = tr.new_space(tr.shapes[node.name][1], [])
    tr.space[node.name] = sid
    tr.shortcuts[node.name] = (src, sid, int(m.pad) // 2)
    tr.sites.append((node.name, sid))  # the shortcut carries kept input channels


def _on_head(tr: _Trace, node: fx.Node, m: nn.Module, src: int) -> None:
    """The head's first channel-mixing layer: its input columns follow the input space."""
    tr.space[node.name] = _HEAD


def _on_unknown_module(tr: _Trace, node: fx.Node, m: nn.Module, src: int) -> None:
    if src >= 0:
        raise tr.fail(node, f"module type {type(m).__name__} is not supported")
    tr.space[node.name] = src if src == _INPUT else _HEAD


_MODULE_HANDLERS = (  # first match wins
    (lambda m: isinstance(m, nn.Conv2d), _on_conv),
    (lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm), _on_bn),
    (lambda m: isinstance(m, _ACT_MODULES), _on_act_module),
    (lambda m: isinstance(m, _PASS_MODULES) or type(m).__name__ in _PASS_NAMES, _on_pass_module),
    (_is_shortcut_a, _on_shortcut),
    (lambda m: isinstance(m, nn.Linear) or type(m).__name__ == "ConvMlp", _on_head),
)


def _on_call_module(tr: _Trace, node: fx.Node) -> None:
    m = tr.modules[node.target]
    if any(True for _ in m.parameters(recurse=False)) or isinstance(m, nn.Conv2d):
        if node.target in tr.called:
            raise tr.fail(node, "a module with parameters is called twice")
        tr.called.add(node.target)
    src = tr.single_input(node)
    handler = next((h for test, h in _MODULE_HANDLERS if test(m)), _on_unknown_module)
    handler(tr, node, m, src)


# -- handlers for call_function / call_method nodes: (trace, node, tensor inputs) ---------------


def _on_add(tr: _Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    """A residual add ties the channel spaces of its inputs into one."""
    spaces = [tr.space[a.name] for a in ins]
    if len(ins) == 1:
        raise tr.fail(node, "add of a tensor and a constant changes act(0)")
    if any(s < 0 for s in spaces):
        if all(s == _HEAD for s in spaces):
            tr.space[node.name] = _HEAD
            return
        raise tr.fail(node, "residual add with the input image or the head")
    for s in spaces[1:]:
        tr.uf.union(s, spaces[0])
    tr.space[node.name] = spaces[0]


def _on_act_function(tr: _Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    src = tr.single_input(node)
    t = node.target
    _act_zero_ok((lambda z: getattr(z, t)()) if isinstance(t, str) else t, str(node.name))
    tr.space[node.name] = src
    tr.read(node, src)


def _on_pass_function(tr: _Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    src = tr.single_input(node)
    if node.target in ("view", "reshape") and src >= 0:
        raise tr.fail(node, "reshaping a feature map is not supported")
    tr.space[node.name] = src


def _on_unknown_function(tr: _Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    if all(tr.space[a.name] == _HEAD for a in ins):
        tr.space[node.name] = _HEAD
        return
    t = node.target
    raise tr.fail(node, f"operation {getattr(t, '__name__', t)!r} is not supported")


_FUNCTION_HANDLERS = (  # call_function targets and call_method names; first match wins
    (lambda t: t in _ADD_FUNCS or t in ("add", "add_"), _on_add),
    (lambda t: t in _ACT_FUNCS or t in _ACT_METHODS, _on_act_function),
    (lambda t: t in _PASS_FUNCS or t in _PASS_METHODS, _on_pass_function),
)


def _on_call_function(tr: _Trace, node: fx.Node) -> None:
    ins = tr.tensor_args(node)
    if node.name not in tr.shapes or not ins:
        return  # shape arithmetic etc.
    t = node.target
    handler = next((h for test, h in _FUNCTION_HANDLERS if test(t)), _on_unknown_function)
    handler(tr, node, ins)


def _on_node(tr: _Trace, node: fx.Node) -> None:
    if node.op == "placeholder":
        tr.space[node.name] = _INPUT
    elif node.op == "get_attr":
        raise tr.fail(node, "reads a parameter or buffer inside forward")
    elif node.op == "call_module":
        _on_call_module(tr, node)
    elif node.op in ("call_function", "call_method"):
        _on_call_function(tr, node)


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
            ShapeProp(gm).propagate(x)
    finally:
        gm.train(was_training)
    shapes: dict[str, tuple[int, ...]] = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            shapes[n.name] = tuple(tm.shape)
    return gm, shapes, x


def _collect_groups(tr: _Trace):
    """Merged spaces -> groups in forward order of their first member; (groups, node_group,
    shortcuts) in group indices."""
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

    def group_of(sid: int) -> int:
        return roots[tr.uf.find(sid)] if sid >= 0 else sid

    for n, sid in tr.sites:
        groups[group_of(sid)].sites.append(n)
    for n, sid in tr.reads:
        groups[group_of(sid)].reads.append(n)
    for g in groups:
        if not g.producers:
            raise UnsupportedArchitecture(f"{tr.model_name}: a channel group has no convolution")
        g.name = g.producers[0] + (f"+{len(g.producers) - 1}" if len(g.producers) > 1 else "")
        if not g.reads:
            g.reads = list(g.sites)
    node_group = {n: group_of(s) for n, s in tr.space.items()}
    shortcuts = {n: (group_of(a), group_of(b), off) for n, (a, b, off) in tr.shortcuts.items()}
    return groups, node_group, shortcuts


def create_split_graph(model: nn.Module, input_size: Sequence[int] | None = None) -> SplitGraph:
    """Trace ``model`` and find its coupled channel groups (in forward order).

    Every node goes to the handler of its kind (``_MODULE_HANDLERS`` for modules,
    ``_FUNCTION_HANDLERS`` for functions and methods), which assigns its output a channel space.

    Args:
        model: the CNN (it is traced, not changed).
        input_size: ``(C, H, W)`` of the example input (default: the model's pretrained cfg).

    Returns:
        The :class:`SplitGraph`.

    Raises:
        UnsupportedArchitecture: a one-line user error for anything that cannot be split
            correctly: concatenation, grouped (non-depthwise) convs, unknown channel-mixing ops,
            a conv module called twice, or an activation with act(0) != 0.
    """
    gm, shapes, x = _trace(model, input_size)
    tr = _Trace(gm, type(model).__name__, shapes)
    for node in gm.graph.nodes:
        _on_node(tr, node)
    groups, node_group, shortcuts = _collect_groups(tr)
    if not groups:
        raise UnsupportedArchitecture(f"{tr.model_name}: no convolution to split")
    return SplitGraph(gm, groups, node_group, shapes, shortcuts, tuple(x.shape[1:]))


def clone_graph_module(sg: SplitGraph) -> fx.GraphModule:
    """An independent copy of the traced model (parameters included)."""
    return copy.deepcopy(sg.gm)
