"""Resolve layer specs (``last_conv``, ``penultimate_fc``, names, globs, ``conv:-2``) to modules.

Registration order is not forward order: the last ``nn.Conv2d`` in ``named_modules()`` is a
head MLP in vgg16_bn, a post-pool FC in mobilenetv3 and a 1x1 MLP in convnext. So every spec is
resolved against one traced dummy forward: we record which leaf modules actually run, in which
order, with which output shape, and which of them run inside ``forward_head`` (the classifier
region). Only modules that ran can be targeted.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["LayerRef", "TraceEntry", "trace_model", "resolve_layers", "DEFAULT_LAYER_SPEC"]

DEFAULT_LAYER_SPEC = "last_conv"
_INDEX_RE = re.compile(r"^(conv|fc):(-?\d+)$")


@dataclass(frozen=True)
class TraceEntry:
    """One leaf module call seen in the traced forward pass."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    in_head: bool
    leaf: bool = True

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 4 and self.shape[2] * self.shape[3] > 1

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def is_fc(self) -> bool:
        # a Linear, or a conv acting as one inside the head (timm's ConvMlp, mobilenetv3 conv_head)
        # (a Linear applied to NHWC maps inside a block, as in convnext, is not an FC layer)
        linear = isinstance(self.module, nn.Linear) and len(self.shape) == 2
        return linear or (self.is_conv and self.in_head)


@dataclass(frozen=True)
class LayerRef:
    """A resolved target layer: the module whose output the doctor reads."""

    name: str
    module: nn.Module
    channels: int
    spatial: bool
    out_shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "conv" if self.spatial else "fc"


def _example_input(model: nn.Module, input_size: Sequence[int] | None) -> torch.Tensor:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.randn(2, *input_size, device=device, dtype=dtype)


def trace_model(model: nn.Module, input_size: Sequence[int] | None = None) -> list[TraceEntry]:
    """Run one eval-mode dummy forward and list the modules in the order their calls returned.

    Only the first call of each module is recorded (a shared module reused later keeps its
    first position). ``in_head`` marks modules that run in ``forward_head`` (timm API).
    """
    x = _example_input(model, input_size)
    names = {m: n for n, m in model.named_modules() if n}

    def run(fn) -> list[tuple[nn.Module, tuple[int, ...]]]:
        seen: list[tuple[nn.Module, tuple[int, ...]]] = []
        done: set[int] = set()

        def hook(mod, _inp, out):
            if id(mod) not in done and isinstance(out, torch.Tensor):
                done.add(id(mod))
                seen.append((mod, tuple(out.shape)))

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
            body = {id(m) for m, _ in run(model.forward_features)}
    finally:
        model.train(was_training)
    return [
        TraceEntry(
            names[m], m, s, bool(body) and id(m) not in body, not any(True for _ in m.children())
        )
        for m, s in full
    ]


def _ref(e: TraceEntry) -> LayerRef:
    channels = e.shape[1] if len(e.shape) >= 2 else e.shape[-1]
    return LayerRef(e.name, e.module, channels, len(e.shape) == 4, e.shape)


def _suggest(spec: str, trace: list[TraceEntry]) -> str:
    names = [e.name for e in trace if e.leaf and (e.is_conv or e.is_fc)]
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    if not close:
        close = names[-5:]
    return ", ".join(close)


def _resolve_one(spec: str, model: nn.Module, trace: list[TraceEntry]) -> list[TraceEntry]:
    convs = [e for e in trace if e.is_conv and e.spatial and not e.in_head]
    fcs = [e for e in trace if e.is_fc]
    if spec in ("last_conv", "conv:-1"):
        if not convs:
            raise ConfigError(
                "layer spec 'last_conv': no convolution with a spatial output (H*W > 1) runs in "
                "this model at this input size"
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
            if len(e.shape) not in (2, 4):
                raise ConfigError(
                    f"layer {e.name!r} outputs a {len(e.shape)}-D tensor {e.shape}; "
                    "Model Doctor needs NCHW feature maps or NC features"
                )
            picked.setdefault(e.name, e)
    order = {e.name: i for i, e in enumerate(trace)}
    entries = sorted(picked.values(), key=lambda e: order[e.name])
    for e in entries:
        _warn_zero_init_bn(e, trace)
    return [_ref(e) for e in entries]
