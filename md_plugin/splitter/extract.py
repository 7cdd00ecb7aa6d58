"""Physical extraction: the narrower network a module stands for, and its cost.

Every convolution keeps ``W[out_keep][:, in_keep]``, every BatchNorm its kept channels, the
first head layer its kept input columns; the rest of the head is kept whole, so the module
still emits all N logits (spec section 5). With act(0) = 0 this computes exactly what the
masked model computes; tests check it per model family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .groups import _HEAD, _INPUT, SplitGraph

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


def _idx(keep: Sequence[torch.Tensor], space: int) -> torch.Tensor | None:
    return None if space in (_INPUT, _HEAD) else keep[space]


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
    """The physically narrower copy of the model that keeps ``masks[g]`` channels of group g.

    Every group must keep at least one channel (the decoder guarantees it).
    """
    keep = [torch.as_tensor(m).bool().nonzero().flatten() for m in masks]
    for g, k in zip(sg.groups, keep):
        if k.numel() == 0:
            raise ValueError(f"group {g.name!r} keeps no channel")
    gm = _shallow_copy(sg.gm)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        src_nodes = [a for a in node.all_input_nodes if a.name in sg.node_group]
        src = sg.node_group[src_nodes[0].name] if src_nodes else _INPUT
        out_space = sg.node_group.get(node.name, _HEAD)
        in_idx = _idx(keep, src)
        if node.name in sg.shortcuts:
            gin, gout, off = sg.shortcuts[node.name]
            kin = keep[gin].tolist()
            pos = {c: i for i, c in enumerate(kin)}
            s = [pos.get(int(j) - off, -1) for j in keep[gout]]
            _set_submodule(gm, node.target, IndexShortcut(m.stride, torch.tensor(s)))
        elif isinstance(m, nn.Conv2d) and out_space >= 0:
            out_idx = keep[out_space]
            if m.groups == 1:
                w = m.weight[out_idx]
                _set_param(m, "weight", w if in_idx is None else w[:, in_idx])
                if in_idx is not None:
                    m.in_channels = int(in_idx.numel())
            else:  # depthwise: in == out space
                _set_param(m, "weight", m.weight[out_idx])
                m.in_channels = m.groups = int(out_idx.numel())
            if m.bias is not None:
                _set_param(m, "bias", m.bias[out_idx])
            m.out_channels = int(out_idx.numel())
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and in_idx is not None:
            _slice_bn(m, in_idx)
        elif in_idx is not None and out_space == _HEAD:
            _slice_head_input(sg, node, src_nodes[0].name, m, in_idx)
    return gm.eval()


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
        width = sg.groups[sg.node_group[src]].channels
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
