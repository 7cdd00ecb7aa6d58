"""One handler per kind of graph node, for the coupled-channel trace of :mod:`.groups`.

Every handler gets the trace state and one fx node (in forward order) and gives the node's
output a channel *layout*: the raw channel spaces it holds, side by side along dim 1 (one space
for most tensors, several after a concatenation). A conv opens a space; per-channel ops keep
their input's; an add or a multiply ties the spaces of its inputs (union-find); a concatenation
lays them side by side. Along the way the handlers record

- **mask sites**: nodes after which a 0/1 channel mask makes a removed channel zero (every BN
  output, a conv output no BN follows, option-A shortcuts);
- **reads**: post-activation outputs whose per-channel L1 norm is the importance;
- **dirt**: tensors whose removed channels may be non-zero (a conv output before its BN, the
  output of an activation with act(0) != 0 such as a squeeze-excitation gate). A layer that
  mixes channels must read clean channels only, else a mask would not equal removal: that is
  refused with one line, as is every op no handler knows.

The tables ``MODULE_HANDLERS`` and ``FUNCTION_HANDLERS`` pick the handler (first match wins).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MDError

__all__ = ["UnsupportedArchitecture", "Trace", "on_node", "is_shortcut_a", "INPUT", "HEAD"]

INPUT = -1  # channel space of the image (never maskable)
HEAD = -2  # after the first channel-mixing layer of the head (never maskable)


class UnsupportedArchitecture(MDError):
    """The model has a channel coupling the splitter cannot handle correctly."""


_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish, nn.Mish, nn.ELU, nn.Tanh,
    nn.Sigmoid, nn.Hardsigmoid,
)  # fmt: skip
# timm's own activation classes (timm.layers.activations / activations_me), by name
_ACT_NAMES = {
    "Swish", "SwishMe", "Mish", "MishMe", "Sigmoid", "Tanh", "HardSwish", "HardSwishMe",
    "HardSigmoid", "HardSigmoidMe", "HardMish", "HardMishMe", "GELU", "GELUTanh", "QuickGELU",
}  # fmt: skip
_ACT_FUNCS = {
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.hardswish, torch.tanh, F.mish,
    F.elu, torch.sigmoid, F.sigmoid, F.hardsigmoid,
}  # fmt: skip
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
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
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_CAT_FUNCS = {torch.cat, torch.concat}

Layout = tuple[int, ...]  # raw space ids side by side, or (INPUT,) / (HEAD,)


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


def _body(layout: Layout) -> bool:
    """True for feature-map channels (maskable); False for the image and the head."""
    return layout[0] >= 0


class Trace:
    """What one pass over the graph has learnt so far (see the module docstring).

    ``units[sid]``: channels that must be kept or removed together in raw space ``sid`` (the
    channels per conv group of a grouped convolution reading it; 1 if absent).
    """

    def __init__(self, gm: fx.GraphModule, model_name: str, shapes: dict[str, tuple[int, ...]]):
        self.model_name = model_name
        self.modules = dict(gm.named_modules())
        self.shapes = shapes
        self.uf = _UnionFind()
        self.layout: dict[str, Layout] = {}
        self.producers: dict[int, list[str]] = {}
        self.widths: dict[int, int] = {}
        self.units: dict[int, int] = {}
        self.sites: list[tuple[str, Layout]] = []
        self.reads: list[tuple[str, Layout]] = []
        self.shortcuts: dict[str, tuple[int, int, int]] = {}
        self.called: set[str] = set()
        self.dirty: dict[str, str] = {}  # node -> why its removed channels may be non-zero
        self.pooled: set[str] = set()  # globally pooled feature maps (SE squeeze, head input)

    def fail(self, node: fx.Node, why: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(
            f"{self.model_name}: cannot split at {node.format_node()}: {why}"
        )

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.name in self.layout]

    def single_input(self, node: fx.Node) -> fx.Node:
        ins = self.tensor_args(node)
        if len(ins) != 1:
            raise self.fail(node, f"expected one tensor input, got {len(ins)}")
        return ins[0]

    def new_space(self, width: int, producers: list[str]) -> int:
        sid = self.uf.new()
        self.widths[sid] = width
        self.producers[sid] = producers
        return sid

    def keep(self, node: fx.Node, src: fx.Node) -> None:
        """A per-channel op: ``node`` has ``src``'s layout and dirt."""
        self.layout[node.name] = self.layout[src.name]
        if src.name in self.dirty:
            self.dirty[node.name] = self.dirty[src.name]

    def site(self, node: fx.Node) -> None:
        """A mask after ``node``: its removed channels are zero from here on."""
        if _body(self.layout[node.name]):
            self.sites.append((node.name, self.layout[node.name]))
            self.dirty.pop(node.name, None)

    def read(self, node: fx.Node) -> None:
        """``node`` is a post-activation output: an importance read point."""
        if _body(self.layout[node.name]):
            self.reads.append((node.name, self.layout[node.name]))

    def need_clean(self, node: fx.Node, src: fx.Node) -> None:
        """``node`` mixes ``src``'s channels: a removed one must be zero there."""
        if _body(self.layout[src.name]) and src.name in self.dirty:
            raise self.fail(
                node,
                f"it mixes channels that are not zero when removed ({self.dirty[src.name]}), "
                "so a channel mask is not kernel removal",
            )

    def tie(self, node: fx.Node, ins: list[fx.Node], what: str) -> None:
        """An elementwise op of same-layout inputs: their spaces become one, position by
        position; ``node`` gets that layout."""
        lays = [self.layout[a.name] for a in ins]
        if any(len(lay) != len(lays[0]) for lay in lays):
            raise self.fail(node, f"{what} of concatenations laid out differently")
        for lay in lays[1:]:
            for a, b in zip(lay, lays[0]):
                if self.widths[a] != self.widths[b]:
                    raise self.fail(node, f"{what} joins {self.widths[a]} and {self.widths[b]} "
                                          "channels")  # fmt: skip
                self.uf.union(a, b)
        self.layout[node.name] = lays[0]


# -- small predicates --------------------------------------------------------------------------


def _at_zero(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """act(0), the largest magnitude over a small zero map."""
    with torch.no_grad():
        return float(fn(torch.zeros(1, 2, 2, 2)).abs().max())


def _is_act_module(m: nn.Module) -> bool:
    return isinstance(m, _ACT_MODULES) or type(m).__name__ in _ACT_NAMES


def _activation(tr: Trace, node: fx.Node) -> Callable | None:
    """The function an activation node applies, or None if ``node`` is no activation."""
    if node.op == "call_module" and _is_act_module(tr.modules[node.target]):
        return tr.modules[node.target]
    if node.op == "call_function" and node.target in _ACT_FUNCS:
        return node.target
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return lambda z, t=node.target: getattr(z, t)()
    return None


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _followed_by_bn(tr: Trace, node: fx.Node) -> bool:
    u = _sole_user(node)
    return (
        u is not None
        and u.op == "call_module"
        and isinstance(tr.modules[u.target], nn.modules.batchnorm._BatchNorm)
    )


def _feeds_gate(tr: Trace, node: fx.Node) -> bool:
    """The conv's only user is an activation with act(0) != 0 (an SE gate): a mask before it
    changes nothing that is kept, so none is placed."""
    u = _sole_user(node)
    fn = _activation(tr, u) if u is not None else None
    return fn is not None and _at_zero(fn) != 0


def _reaches_mul(node: fx.Node) -> bool:
    """Some path from ``node`` meets a multiply (a squeeze-excitation branch, not the head)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.name in seen:
                continue
            if u.op in ("call_function", "call_method") and u.target in _MUL_FUNCS:
                return True
            seen.add(u.name)
            todo.append(u)
    return False


def _in_head(tr: Trace, node: fx.Node, src: fx.Node) -> bool:
    """A conv is in the head if its output is not a feature map, or if it reads a globally
    pooled map and never feeds a multiply (mobilenetv3's conv_head; an SE's convs do)."""
    shp = tr.shapes.get(node.name)
    if shp is None or len(shp) != 4:
        return True
    return src.name in tr.pooled and not _reaches_mul(node)


def _reduced_dims(tr: Trace, node: fx.Node, src: fx.Node) -> set[int]:
    """Dims a mean/amax reduces (all of them when none is given)."""
    nd = len(tr.shapes[src.name])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return set(range(nd))
    return {d % nd for d in ((dim,) if isinstance(dim, int) else dim)}


# -- handlers for call_module nodes: (trace, node, module, input node) --------------------------


def _on_conv(tr: Trace, node: fx.Node, m: nn.Conv2d, src: fx.Node) -> None:
    """A conv opens a channel space (grouped and depthwise convs keep their input's)."""
    if tr.layout[src.name] == (HEAD,) or _in_head(tr, node, src):
        return _on_head(tr, node, m, src)
    if m.groups > 1:
        return _on_grouped_conv(tr, node, m, src)
    tr.need_clean(node, src)
    tr.layout[node.name] = (tr.new_space(m.out_channels, [node.target]),)
    if _feeds_gate(tr, node):
        tr.dirty[node.name] = f"the gate input {node.target!r}"
    elif m.bias is not None or not _followed_by_bn(tr, node):
        tr.site(node)
    else:
        tr.dirty[node.name] = f"{node.target!r} before its BatchNorm"


def _on_grouped_conv(tr: Trace, node: fx.Node, m: nn.Conv2d, src: fx.Node) -> None:
    """A grouped conv with equal input and output widths per group keeps its input's space
    (output channel j and input channel j lie in the same conv group); a gene then keeps or
    removes whole conv groups, so the extracted conv is again an equal-group conv."""
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    if cin != cout:
        raise tr.fail(
            node,
            f"grouped convolution (groups={g}) with {cin // g} input and {cout // g} output "
            "channels per group is not supported (only equal widths keep whole groups together)",
        )
    lay = tr.layout[src.name]
    if cin // g > 1 and _body(lay):
        if len(lay) != 1:
            raise tr.fail(node, "grouped convolution over concatenated channels is not supported")
        tr.units[lay[0]] = math.lcm(tr.units.get(lay[0], 1), cin // g)
    tr.keep(node, src)
    if m.bias is not None:
        tr.site(node)


def _on_bn(tr: Trace, node: fx.Node, m: nn.Module, src: fx.Node) -> None:
    """Mask after every BN (a mask before it is not removal: BN adds a bias). With a BN before
    its conv (DenseNet) this is the mask "after every consumer BN" of the channels it holds."""
    tr.keep(node, src)
    tr.site(node)
    act = getattr(m, "act", None)  # timm BatchNormAct2d: the mask follows its activation
    if act is not None and not isinstance(act, nn.Identity):
        tr.read(node)


def _on_act_module(tr: Trace, node: fx.Node, m: nn.Module, src: fx.Node) -> None:
    _on_activation(tr, node, m, f"{type(m).__name__} {node.target!r}", src)


def _on_activation(tr: Trace, node: fx.Node, fn: Callable, name: str, src: fx.Node) -> None:
    """act(0) = 0 keeps removed channels zero (a read point); act(0) != 0 makes them dirty:
    fine for a gate that multiplies a clean map, refused where channels are mixed."""
    tr.keep(node, src)
    v = _at_zero(fn)
    if v == 0:
        tr.read(node)
    elif _body(tr.layout[node.name]):
        tr.dirty[node.name] = f"{name} has act(0) = {v:.3g}"


def _on_pass_module(tr: Trace, node: fx.Node, m: nn.Module, src: fx.Node) -> None:
    """Per-channel modules (pools, dropout, flatten) keep their input's space."""
    if type(m).__name__ == "SelectAdaptivePool2d" and "cat" in str(getattr(m, "pool_type", "")):
        raise tr.fail(node, "concatenating pools are not supported")
    tr.keep(node, src)
    glob = type(m).__name__ == "SelectAdaptivePool2d" or (
        getattr(m, "output_size", None) in (1, (1, 1))
    )
    if glob or src.name in tr.pooled:
        tr.pooled.add(node.name)


def _on_shortcut(tr: Trace, node: fx.Node, m: nn.Module, src: fx.Node) -> None:
    """Option-A shortcut: a new space (the stage's) holding the input's channels at an offset."""
    tr.need_clean(node, src)
    sid = tr.new_space(tr.shapes[node.name][1], [])
    tr.layout[node.name] = (sid,)
    tr.shortcuts[node.name] = (tr.layout[src.name][0], sid, int(m.pad) // 2)
    tr.site(node)  # the shortcut carries kept input channels


def _on_head(tr: Trace, node: fx.Node, m: nn.Module, src: fx.Node) -> None:
    """The head's first channel-mixing layer: its input columns follow the input space."""
    tr.need_clean(node, src)
    tr.layout[node.name] = (HEAD,)


def _on_unknown_module(tr: Trace, node: fx.Node, m: nn.Module, src: fx.Node) -> None:
    lay = tr.layout[src.name]
    if _body(lay):
        raise tr.fail(node, f"module type {type(m).__name__} is not supported")
    tr.layout[node.name] = lay if lay == (INPUT,) else (HEAD,)


def is_shortcut_a(m: nn.Module) -> bool:
    """md_plugin's option-A shortcut: subsample and zero-pad channels symmetrically."""
    return type(m).__name__ == "ShortcutA" and hasattr(m, "pad") and hasattr(m, "stride")


MODULE_HANDLERS = (  # first match wins
    (lambda m: isinstance(m, nn.Conv2d), _on_conv),
    (lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm), _on_bn),
    (_is_act_module, _on_act_module),
    (lambda m: isinstance(m, _PASS_MODULES) or type(m).__name__ in _PASS_NAMES, _on_pass_module),
    (is_shortcut_a, _on_shortcut),
    (lambda m: isinstance(m, nn.Linear) or type(m).__name__ == "ConvMlp", _on_head),
)


def _on_call_module(tr: Trace, node: fx.Node) -> None:
    m = tr.modules[node.target]
    if any(True for _ in m.parameters(recurse=False)) or isinstance(m, nn.Conv2d):
        if node.target in tr.called:
            raise tr.fail(node, "a module with parameters is called twice")
        tr.called.add(node.target)
    src = tr.single_input(node)
    handler = next((h for test, h in MODULE_HANDLERS if test(m)), _on_unknown_module)
    handler(tr, node, m, src)


# -- handlers for call_function / call_method nodes: (trace, node, tensor inputs) ---------------


def _special(tr: Trace, node: fx.Node, ins: list[fx.Node], what: str) -> bool:
    """Inputs outside the feature maps: all head -> head (True); a mix with the image or the
    head is refused; all feature maps -> False."""
    lays = [tr.layout[a.name] for a in ins]
    if all(_body(lay) for lay in lays):
        return False
    if all(lay == (HEAD,) for lay in lays):
        tr.layout[node.name] = (HEAD,)
        return True
    raise tr.fail(node, f"{what} with the input image or the head")


def _on_add(tr: Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    """A residual add ties the channel spaces of its inputs into one."""
    if len(ins) == 1:
        raise tr.fail(node, "add of a tensor and a constant changes act(0)")
    if _special(tr, node, ins, "residual add"):
        return
    tr.tie(node, ins, "an add")
    reasons = [tr.dirty[a.name] for a in ins if a.name in tr.dirty]
    if reasons:
        tr.dirty[node.name] = reasons[0]


def _on_mul(tr: Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    """``x * gate``: channel j scales channel j, so the spaces are tied (the SE's expand conv
    joins the channels it gates). Zero times anything is zero: clean if any input is."""
    if len(ins) == 1:
        if any(a is not ins[0] for a in node.all_input_nodes):
            raise tr.fail(node, "a multiply by a tensor made inside forward")
        return tr.keep(node, ins[0])  # times a number
    if _special(tr, node, ins, "a multiply"):
        return
    chans = {tr.shapes[a.name][1] for a in ins}
    if len(chans) != 1:
        raise tr.fail(node, f"a multiply broadcasts across channels ({sorted(chans)})")
    tr.tie(node, ins, "a multiply")
    if all(a.name in tr.dirty for a in ins):
        tr.dirty[node.name] = tr.dirty[ins[0].name]


def _on_cat(tr: Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    """Concatenation along channels lays the inputs' channel spaces side by side."""
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim % len(tr.shapes[node.name]) != 1:
        raise tr.fail(node, f"concatenation along dim {dim}, not the channels")
    if not all(isinstance(p, fx.Node) and p.name in tr.layout for p in parts):
        raise tr.fail(node, "concatenation of something that is not a traced tensor")
    if _special(tr, node, list(parts), "a concatenation"):
        return
    tr.layout[node.name] = sum((tr.layout[p.name] for p in parts), ())
    reasons = [tr.dirty[p.name] for p in parts if p.name in tr.dirty]
    if reasons:
        tr.dirty[node.name] = reasons[0]


def _on_act_function(tr: Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    src = tr.single_input(node)
    t = node.target
    name = f"{getattr(t, '__name__', t)} {node.name!r}"
    _on_activation(tr, node, _activation(tr, node), name, src)


def _on_pass_function(tr: Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    src = tr.single_input(node)
    t = node.target
    body = _body(tr.layout[src.name])
    if t in ("view", "reshape") and body:
        raise tr.fail(node, "reshaping a feature map is not supported")
    glob = False
    if t in ("mean", "amax"):
        dims = _reduced_dims(tr, node, src)
        if 1 in dims and body:
            raise tr.fail(node, f"{t} over the channels mixes them")
        glob = {2, 3} <= dims
    elif t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        glob = (node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")) in (
            1,
            (1, 1),
        )
    tr.keep(node, src)
    if glob or src.name in tr.pooled:
        tr.pooled.add(node.name)


def _on_unknown_function(tr: Trace, node: fx.Node, ins: list[fx.Node]) -> None:
    if all(tr.layout[a.name] == (HEAD,) for a in ins):
        tr.layout[node.name] = (HEAD,)
        return
    t = node.target
    raise tr.fail(node, f"operation {getattr(t, '__name__', t)!r} is not supported")


FUNCTION_HANDLERS = (  # call_function targets and call_method names; first match wins
    (lambda t: t in _ADD_FUNCS, _on_add),
    (lambda t: t in _MUL_FUNCS, _on_mul),
    (lambda t: t in _CAT_FUNCS, _on_cat),
    (lambda t: t in _ACT_FUNCS or t in _ACT_METHODS, _on_act_function),
    (lambda t: t in _PASS_FUNCS or t in _PASS_METHODS, _on_pass_function),
)


def _on_call_function(tr: Trace, node: fx.Node) -> None:
    ins = tr.tensor_args(node)
    if node.name not in tr.shapes or not ins:
        if isinstance(node.meta.get("tensor_meta"), (tuple, list)) and any(
            _body(tr.layout[a.name]) for a in ins
        ):
            raise tr.fail(node, "splitting a feature map into several tensors is not supported")
        return  # shape arithmetic etc.
    t = node.target
    handler = next((h for test, h in FUNCTION_HANDLERS if test(t)), _on_unknown_function)
    handler(tr, node, ins)


def on_node(tr: Trace, node: fx.Node) -> None:
    """Dispatch one node to the handler of its kind."""
    if node.op == "placeholder":
        tr.layout[node.name] = (INPUT,)
    elif node.op == "get_attr":
        raise tr.fail(node, "reads a parameter or buffer inside forward")
    elif node.op == "call_module":
        _on_call_module(tr, node)
    elif node.op in ("call_function", "call_method"):
        _on_call_function(tr, node)
