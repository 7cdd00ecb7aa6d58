"""Resolve layer specs (``last_conv``, ``penultimate_fc``, names, globs, ``conv:-2``) to modules.

Registration order is not forward order: the last ``nn.Conv2d`` in ``named_modules()`` is a
head MLP in vgg16_bn, a post-pool FC in mobilenetv3 and a 1x1 MLP in convnext. So every spec is
resolved against one traced dummy forward: we record which leaf modules actually run, in which
order, with which output shape, and which of them run inside ``forward_head`` (the classifier
region). Only modules that ran can be targeted.

Each output's *channel axis* is found from the module type and the traced shapes (see
:func:`channel_axis`), so NCHW conv maps, NHWC blocks (convnext ``mlp.fc2``/``norm`` without
``conv_mlp``, swin stages) and ``[B, N, C]`` token sequences are all read per real channel;
tokens play the role of spatial positions (class/register tokens have no position).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = [
    "DEFAULT_LAYER_SPEC",
    "LayerRef",
    "TraceEntry",
    "channel_axis",
    "resolve_layers",
    "trace_model",
]

DEFAULT_LAYER_SPEC = "last_conv"
_INDEX_RE = re.compile(r"^(conv|fc):(-?\d+)$")
_BLOCK_RE = re.compile(r"(^|\.)blocks\.\d+$")


@dataclass(frozen=True)
class TraceEntry:
    """One module call seen in the traced forward pass.

    ``channel_dim`` is the axis of ``shape`` that holds the channels (None: could not be told);
    for token sequences ``grid`` is the (h, w) patch grid and ``prefix_tokens`` the number of
    class/register tokens in front of it.
    """

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    in_head: bool
    leaf: bool = True
    channel_dim: int | None = 1
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0

    @property
    def spatial(self) -> bool:
        if len(self.shape) == 4:
            cd = self.channel_dim if self.channel_dim is not None else 1
            return math.prod(s for i, s in enumerate(self.shape) if i not in (0, cd)) > 1
        return self.grid is not None and self.grid[0] * self.grid[1] > 1

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def is_fc(self) -> bool:
        # a Linear, or a conv acting as one inside the head (timm's ConvMlp, mobilenetv3 conv_head)
        # (a Linear applied to NHWC maps or tokens inside a block is not an FC layer)
        linear = isinstance(self.module, nn.Linear) and len(self.shape) == 2
        return linear or (self.is_conv and self.in_head)


@dataclass(frozen=True)
class LayerRef:
    """A resolved target layer: the module whose output the doctor reads.

    ``channel_dim`` says where the channels are in the module's output: 1 for NCHW maps and
    [B, C] features, the last axis for NHWC maps and [B, N, C] tokens. Everything that reduces
    per channel goes through :meth:`channels_first` and everything spatial through
    :meth:`spatial_map`, so the diagnosis and the losses never read H as channels.
    """

    name: str
    module: nn.Module
    channels: int
    spatial: bool
    out_shape: tuple[int, ...]
    channel_dim: int = 1
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0

    @property
    def kind(self) -> str:
        return "conv" if self.spatial else "fc"

    @property
    def layout(self) -> str:
        """``nc``, ``nchw``, ``nhwc``, ``nlc`` (tokens) or ``ncl``."""
        nd = len(self.out_shape)
        if nd == 2:
            return "nc"
        if nd == 3:
            return "ncl" if self.channel_dim == 1 else "nlc"
        return "nchw" if self.channel_dim == 1 else "nhwc"

    def channels_first(self, t: torch.Tensor) -> torch.Tensor:
        """This layer's output (or its gradient) as [B, C, *positions]."""
        return t if self.channel_dim == 1 else t.movedim(self.channel_dim, 1)

    def spatial_map(self, t: torch.Tensor) -> torch.Tensor | None:
        """[B, C, H, W] over the image grid (prefix tokens dropped), or None if there is none."""
        t = self.channels_first(t)
        if t.dim() == 4:
            return t
        if t.dim() == 3 and self.grid is not None:
            return t[:, :, self.prefix_tokens :].reshape(t.shape[0], t.shape[1], *self.grid)
        return None


def _example_input(model: nn.Module, input_size: Sequence[int] | None) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    # a private generator: tracing must not move the global RNG (seeded runs stay reproducible)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *input_size, generator=gen).to(device, dtype)


def _width(m: nn.Module) -> int | None:
    """The channel count a module declares (conv/linear/norm), if any."""
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    ns = getattr(m, "normalized_shape", None)
    if isinstance(ns, (tuple, list)) and len(ns) == 1:
        return int(ns[0])
    return None


_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)


def _type_axis(m: nn.Module, ndim: int) -> int | None:
    """Channel axis from the module type: timm's ``*2d`` norms and torch convs/norms are
    channels-first; Linear and LayerNorm/RmsNorm (over the last axis) are channels-last."""
    if ndim == 2:
        return 1
    name = type(m).__name__.lower()
    if isinstance(m, _CHANNELS_FIRST) or "2d" in name or "1d" in name:
        return 1
    if isinstance(m, (nn.Linear, nn.LayerNorm)) or "layernorm" in name or "rmsnorm" in name:
        return ndim - 1
    return None


def _unique_axis(shape: tuple[int, ...], width: int | None) -> int | None:
    if width is None:
        return None
    hits = [i for i in range(1, len(shape)) if shape[i] == width]
    return hits[0] if len(hits) == 1 else None


def channel_axis(
    module: nn.Module,
    shape: tuple[int, ...],
    in_shape: tuple[int, ...] | None = None,
    inner_width: int | None = None,
    earlier: Sequence[tuple[tuple[int, ...], int | None]] = (),
) -> int | None:
    """Which axis of ``module``'s output ``shape`` holds the channels (None if unclear).

    In order: the module type, checked against the width it declares; the unique axis whose size
    is that width; for containers, the unique axis matching the width of the last typed layer
    that ran inside (``inner_width``: a convnext block ends in an NHWC ``fc2`` but returns NCHW,
    a swin block returns NHWC); for shape-preserving layers without a width (Identity, GELU,
    Dropout), the axis of the latest earlier output of the same shape (``earlier``).
    """
    if len(shape) == 2:
        return 1
    width = _width(module)
    axis = _type_axis(module, len(shape))
    if axis is not None and (width is None or shape[axis] == width):
        return axis
    axis = _unique_axis(shape, width)
    if axis is not None:
        return axis
    if inner_width is not None:
        return _unique_axis(shape, inner_width)
    if in_shape == shape:
        for s, ax in reversed(earlier):
            if s == shape and ax is not None:
                return ax
    return None


def _token_grid(
    n: int, hw: tuple[int, int], hint: int | None
) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, (h, w)) such that n - prefix tokens tile the image's aspect ratio."""
    h, w = hw
    cands = ([hint] if hint is not None else []) + list(range(0, min(n, 9)))
    for p in cands:
        m = n - p
        if m <= 0:
            continue
        s = math.sqrt(h * w / m)
        gh, gw = round(h / s), round(w / s)
        if gh >= 1 and gw >= 1 and gh * gw == m:
            return p, (gh, gw)
    return None


def trace_model(model: nn.Module, input_size: Sequence[int] | None = None) -> list[TraceEntry]:
    """Run one eval-mode dummy forward and list the modules in the order their calls returned.

    Only the first call of each module is recorded (a shared module reused later keeps its
    first position). ``in_head`` marks modules that run in ``forward_head`` (timm API). Each
    entry carries its output's channel axis (:func:`channel_axis`) and, for tokens, the grid.
    """
    x = _example_input(model, input_size)
    names = {m: n for n, m in model.named_modules() if n}
    Seen = tuple[nn.Module, tuple[int, ...], "tuple[int, ...] | None"]

    def run(fn) -> list[Seen]:
        seen: list[Seen] = []
        done: set[int] = set()

        def hook(mod, inp, out):
            if id(mod) not in done and isinstance(out, torch.Tensor):
                done.add(id(mod))
                first = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
                seen.append((mod, tuple(out.shape), None if first is None else tuple(first.shape)))

        handles = [m.register_forward_hook(hook) for m in names]
        try:
            with torch.no_grad():
                fn(x)
        finally:
            for h in handles:
                h.remove()
        return seen

    was_training = model.training
    model.eval()
    try:
        full = run(model)
        body: set[int] = set()
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            body = {id(m) for m, _, _ in run(model.forward_features)}
    finally:
        model.train(was_training)
    hw = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() >= 3 else (1, 1)
    hint = getattr(model, "num_prefix_tokens", None)
    hint = hint if isinstance(hint, int) else None
    entries: list[TraceEntry] = []
    earlier: list[tuple[tuple[int, ...], int | None]] = []
    typed: list[tuple[str, int]] = []  # (name, width) of typed layers, in trace order
    for m, s, ins in full:
        name = names[m]
        leaf = not any(True for _ in m.children())
        inner = None
        if not leaf:
            inner = next((w for n, w in reversed(typed) if n.startswith(name + ".")), None)
        # a first axis that is not the batch (swin's windows [B * nW, N, C]) has no channel
        # axis we could use: per-sample reductions would mix samples
        axis = channel_axis(m, s, ins, inner, earlier) if s and s[0] == x.shape[0] else None
        if leaf and axis is not None and _width(m) is not None:
            typed.append((name, s[axis]))
        earlier.append((s, axis))
        grid, prefix = None, 0
        if len(s) == 3 and axis == 2:
            tg = _token_grid(s[1], hw, hint)
            if tg is not None:
                prefix, grid = tg
        in_head = bool(body) and id(m) not in body
        entries.append(TraceEntry(name, m, s, in_head, leaf, axis, grid, prefix))
    return entries


def _ref(e: TraceEntry) -> LayerRef:
    cd = e.channel_dim if e.channel_dim is not None else 1
    spatial = len(e.shape) == 4 or e.grid is not None  # has a position map (maybe 1x1)
    return LayerRef(e.name, e.module, e.shape[cd], spatial, e.shape, cd, e.grid, e.prefix_tokens)


def _stem_only(last: TraceEntry, trace: list[TraceEntry]) -> bool:
    """The last spatial conv is the model's first conv (a stem or patch embedding) and layers
    with parameters that are not convolutions run on its maps/tokens afterwards (a ViT)."""
    first_conv = next(e for e in trace if e.is_conv)
    if first_conv is not last:
        return False
    pos = trace.index(last)
    return any(
        e.leaf
        and not e.in_head
        and not e.is_conv
        and len(e.shape) in (3, 4)
        and any(True for _ in e.module.parameters(recurse=False))
        for e in trace[pos + 1 :]
    )


def _suggest_block(trace: list[TraceEntry]) -> str | None:
    """The last block of the body whose output has a known channel axis (a transformer block)."""
    body = [
        e
        for e in trace
        if not e.in_head and not e.leaf and e.channel_dim is not None and len(e.shape) in (3, 4)
    ]
    for pat in (_BLOCK_RE, re.compile(r"\.\d+$")):
        hits = [e.name for e in body if pat.search(e.name)]
        if hits:
            return hits[-1]
    return None


def _suggest(spec: str, trace: list[TraceEntry]) -> str:
    names = [
        e.name
        for e in trace
        if e.leaf and (e.is_conv or e.is_fc or isinstance(e.module, (nn.Linear, nn.LayerNorm)))
    ]
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    if not close:
        close = names[-5:]
    return ", ".join(close)


def _resolve_one(spec: str, model: nn.Module, trace: list[TraceEntry]) -> list[TraceEntry]:
    convs = [e for e in trace if e.is_conv and e.spatial and not e.in_head]
    fcs = [e for e in trace if e.is_fc]
    if spec in ("last_conv", "conv:-1"):
        block = _suggest_block(trace)
        hint = f"; target a block instead, e.g. --md-layers {block}" if block else ""
        if not convs:
            raise ConfigError(
                f"layer spec {spec!r}: no convolution with a spatial output (H*W > 1) runs in "
                f"this model at this input size{hint}"
            )
        if _stem_only(convs[-1], trace):
            raise ConfigError(
                f"layer spec {spec!r}: the only spatial convolution in this model is its stem "
                f"{convs[-1].name!r} (what follows is not convolutional, e.g. a transformer)"
                f"{hint or '; target a later module by name'}"
            )
        return [convs[-1]]
    if spec in ("penultimate_fc", "fc:-2"):
        if len(fcs) < 2:
            raise ConfigError(
                f"layer spec {spec!r}: this model has {len(fcs)} fully connected layer(s) "
                f"({', '.join(e.name for e in fcs) or 'none'}), so there is no penultimate FC; "
                "use last_conv or a module name"
            )
        return [fcs[-2]]
    m = _INDEX_RE.match(spec)
    if m:
        pool = convs if m.group(1) == "conv" else fcs
        idx = int(m.group(2))
        if m.group(1) == "fc" and (idx == -1 or idx == len(pool) - 1):
            raise ConfigError(
                f"layer spec {spec!r} is the classifier output: its gradient w.r.t. the logits is "
                "a constant one-hot, nothing to diagnose; use fc:-2"
            )
        if not -len(pool) <= idx < len(pool):
            raise ConfigError(
                f"layer spec {spec!r} is out of range: the model runs {len(pool)} "
                f"{'spatial convolutions' if m.group(1) == 'conv' else 'FC layers'}"
            )
        return [pool[idx]]
    by_name = {e.name: e for e in trace}
    if any(c in spec for c in "*?["):
        hits = [e for e in trace if e.leaf and fnmatch.fnmatchcase(e.name, spec)]
        if not hits:
            raise ConfigError(
                f"layer spec {spec!r} matches no module that runs in the forward pass; "
                f"nearby names: {_suggest(spec.replace('*', ''), trace)}"
            )
        return hits
    if spec in by_name:
        return [by_name[spec]]
    modules = dict(model.named_modules())
    if spec in modules:
        raise ConfigError(
            f"layer {spec!r} exists but does not run in the forward pass (containers inside "
            "gradient checkpointing never fire their hooks); target a leaf such as: "
            f"{_suggest(spec, trace)}"
        )
    raise ConfigError(
        f"layer spec {spec!r} matches no module; nearby names: {_suggest(spec, trace)}"
    )


def _warn_zero_init_bn(entry: TraceEntry, trace: list[TraceEntry]) -> None:
    """A BN with all-zero gamma right after the target makes its gradient exactly zero."""
    leaves = [e for e in trace if e.leaf]
    pos = next((i for i, e in enumerate(leaves) if e.module is entry.module), None)
    if pos is not None and pos + 1 < len(leaves):
        nxt = leaves[pos + 1].module
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.weight is not None:
            if torch.count_nonzero(nxt.weight) == 0:
                warnings.warn(
                    f"layer {entry.name!r} feeds {leaves[pos + 1].name!r}, a BatchNorm whose weight "
                    "is all zero (timm's zero_init_last): every gradient at this layer is exactly 0 "
                    "until that BatchNorm learns. Load a trained checkpoint, pass "
                    "--model-kwargs zero_init_last=False, or target another layer.",
                    stacklevel=3,
                )


def resolve_layers(
    model: nn.Module,
    specs: str | Sequence[str] = DEFAULT_LAYER_SPEC,
    input_size: Sequence[int] | None = None,
) -> list[LayerRef]:
    """Resolve one or more specs to distinct target layers, in forward order.

    Specs: ``last_conv`` (= ``conv:-1``), ``conv:<i>``, ``penultimate_fc`` (= ``fc:-2``),
    ``fc:<i>``, an exact module name, or a glob such as ``layer3.*.conv2``. A comma-separated
    string is split.
    """
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",")]
    specs = [s for s in specs if s]
    if not specs:
        raise ConfigError("the layer list is empty: give at least one layer spec, e.g. last_conv")
    trace = trace_model(model, input_size)
    picked: dict[str, TraceEntry] = {}
    for spec in specs:
        for e in _resolve_one(spec, model, trace):
            if len(e.shape) not in (2, 3, 4):
                raise ConfigError(
                    f"layer {e.name!r} outputs a {len(e.shape)}-D tensor {e.shape}; Model Doctor "
                    "needs NCHW/NHWC feature maps, [B, N, C] tokens or [B, C] features"
                )
            if e.channel_dim is None:
                raise ConfigError(
                    f"cannot tell which axis of layer {e.name!r}'s output {e.shape} holds the "
                    "channels (or its first axis is not the batch); target a conv, linear or "
                    "norm layer near it, e.g. "
                    f"{_suggest(e.name, trace)}"
                )
            picked.setdefault(e.name, e)
    order = {e.name: i for i, e in enumerate(trace)}
    entries = sorted(picked.values(), key=lambda e: order[e.name])
    for e in entries:
        _warn_zero_init_bn(e, trace)
    return [_ref(e) for e in entries]
