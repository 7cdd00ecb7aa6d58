"""Physical extraction: the narrower network a module stands for, and its cost.

Every convolution keeps ``W[out_keep][:, in_keep]`` (a grouped or depthwise conv its kept conv
groups), every BatchNorm its kept channels, the first head layer its kept input columns; the
rest of the head is kept whole, so the module still emits all N logits (spec section 5). A
tensor holding several groups side by side (after a concatenation) keeps each group's kept
channels at that group's place. This computes exactly what the masked model computes; tests
check it per model family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .groups import SplitGraph
from .handlers import HEAD

__all__ = ["IndexShortcut", "extract_module", "count_cost"]


class IndexShortcut(nn.Module):
    """Option-A shortcut after extraction: subsample, then gather kept input channels.

    ``src[j]`` is the input channel feeding output channel j, or -1 for a zero channel.
    """

    def __init__(self, stride: int, src: torch.Tensor):
        super().__init__()
        self.stride = stride
        self.register_buffer("src", src.long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.src.numel(), x.shape[2], x.shape[3])
        valid = self.src >= 0
        out[:, valid] = x[:, self.src[valid]]
        return out


def _set_param(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        setattr(m, name, value.clone())


def _slice_conv_in(conv: nn.Conv2d, idx: torch.Tensor) -> None:
    _set_param(conv, "weight", conv.weight[:, idx])
    conv.in_channels = int(idx.numel())


def _slice_bn(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(bn, name, None) is not None:
            _set_param(bn, name, getattr(bn, name)[idx])
    bn.num_features = int(idx.numel())


def _set_submodule(gm: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


@torch.no_grad()
def extract_module(sg: SplitGraph, masks: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The physically narrower copy of the model that keeps ``masks[g]`` of group g.

    Args:
        sg: the split graph of the strong model.
        masks: one bool vector per group, one entry per unit (``ChannelGroup.channels``);
            every group must keep at least one (the decoder guarantees it).

    Returns:
        The extracted network in eval mode; it shares no parameter with the strong model.
    """
    keep = []
    for g, m in zip(sg.groups, masks):
        k = g.expand(torch.as_tensor(m).bool()).nonzero().flatten()
        if k.numel() == 0:
            raise ValueError(f"group {g.name!r} keeps no channel")
        keep.append(k)
    gm = _shallow_copy(sg.gm)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            _slice_module(sg, gm, node, modules[node.target], keep)
    return gm.eval()


def _slice_module(
    sg: SplitGraph, gm: nn.Module, node: fx.Node, m: nn.Module, keep: list[torch.Tensor]
) -> None:
    """Slice one module's channels to the kept ones of its input and output layouts."""
    src = next((a.name for a in node.all_input_nodes if a.name in sg.layouts), None)
    in_idx = sg.channel_index(src, keep) if src is not None else None
    out_idx = sg.channel_index(node.name, keep) if node.name in sg.layouts else None
    if node.name in sg.shortcuts:
        gin, gout, off = sg.shortcuts[node.name]
        pos = {c: i for i, c in enumerate(keep[gin].tolist())}
        s = [pos.get(int(j) - off, -1) for j in keep[gout]]
        _set_submodule(gm, node.target, IndexShortcut(m.stride, torch.tensor(s)))
    elif isinstance(m, nn.Conv2d) and out_idx is not None:
        _slice_conv(m, in_idx, out_idx)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and in_idx is not None:
        _slice_bn(m, in_idx)
    elif in_idx is not None and sg.layouts.get(node.name) == (HEAD,):
        _slice_head_input(sg, node, src, m, in_idx)


def _slice_conv(m: nn.Conv2d, in_idx: torch.Tensor | None, out_idx: torch.Tensor) -> None:
    """Keep output channels ``out_idx`` and input channels ``in_idx``. A grouped (or
    depthwise) conv keeps its input's channels, whole conv groups of them, so it stays an
    equal-group conv with fewer groups."""
    w = m.weight[out_idx]
    if m.groups == 1:
        _set_param(m, "weight", w if in_idx is None else w[:, in_idx])
        if in_idx is not None:
            m.in_channels = int(in_idx.numel())
    else:
        per_group = m.in_channels // m.groups
        _set_param(m, "weight", w)
        m.in_channels = int(out_idx.numel())
        m.groups = m.in_channels // per_group
    if m.bias is not None:
        _set_param(m, "bias", m.bias[out_idx])
    m.out_channels = int(out_idx.numel())


def _shallow_copy(m: nn.Module) -> nn.Module:
    """A copy of the module tree that shares tensors but owns its attribute dicts, so slicing
    (which assigns new parameters) leaves the strong model intact. Unlike ``deepcopy`` it
    copies no tensor and does not regenerate the GraphModule's code: ~100x faster, which
    matters when every GA candidate is extracted."""
    new = object.__new__(type(m))  # no __copy__: GraphModule's would recompile its code
    d = dict(m.__dict__)
    d["_parameters"] = dict(m._parameters)
    d["_buffers"] = dict(m._buffers)
    d["_modules"] = {
        k: (_shallow_copy(v) if v is not None else None) for k, v in m._modules.items()
    }
    new.__dict__ = d
    return new


def _slice_head_input(
    sg: SplitGraph, node: fx.Node, src: str, m: nn.Module, idx: torch.Tensor
) -> None:
    """The first head layer reads the kept channels only (a flattened C*H*W map: their cells)."""
    if isinstance(m, nn.Linear):
        width = sum(w for _, _, w in sg.segments(src))
        hw = m.in_features // width
        if hw * width != m.in_features:
            raise ValueError(f"{node.target}: {m.in_features} inputs for {width} channels")
        cols = (idx[:, None] * hw + torch.arange(hw)[None]).flatten()
        _set_param(m, "weight", m.weight[:, cols])
        m.in_features = int(cols.numel())
    elif isinstance(m, nn.Conv2d):
        _slice_conv_in(m, idx)
    elif type(m).__name__ == "ConvMlp":
        _slice_conv_in(m.fc1, idx)
    else:  # pragma: no cover - create_split_graph refuses other consumers
        raise ValueError(f"cannot slice the input of {type(m).__name__}")


@torch.no_grad()
def count_cost(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """(multiply-accumulates per image, parameters) of conv and linear layers, by hooks."""
    macs = [0]

    def conv_hook(m: nn.Conv2d, _inp, out):
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        macs[0] += out[0].numel() * k

    def lin_hook(m: nn.Linear, _inp, out):
        macs[0] += out[0].numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    p = next(model.parameters())
    try:
        model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return macs[0], sum(q.numel() for q in model.parameters())
