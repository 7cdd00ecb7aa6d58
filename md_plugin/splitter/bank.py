"""ModuleBank: M modules of one strong model in one batched forward.

The search, the layer-sensitivity analysis and module calibration all score many modules on
the same images. Running them one at a time repeats the Python and dispatch overhead M times
and cannot learn anything across them; the bank runs them together. It is a copy of the traced
strong model (frozen weights, BatchNorm in eval mode) whose every mask site is followed by a
small op that views the activation as ``[M, B, C, ...]`` and applies module m's per-site affine
and channel mask: ``y -> (y * scale_m + shift_m) * mask_m``. The image batch is repeated M
times inside, so the backbone runs on M*B images.

Index spaces (the same everywhere in the splitter):

- ``masks`` [M, K]: K = sum of ``ChannelGroup.channels`` (group order; one entry per unit), as
  :attr:`SplitModules.masks`. Float, may require grad (0/1 or straight-through values).
- ``scale`` / ``shift`` [M, S]: one entry per (group, site, channel): groups in order, each
  group's ``sites`` in order, ``ChannelGroup.width`` entries each (per channel, not per unit:
  a BatchNorm re-estimation is per channel). :class:`AffineLayout` holds the positions.

An entry is *free* where the affine folds exactly into the module's weights: at a BatchNorm
output (scale and shift, into the BN's weight and bias), at a conv output (scale into the
conv's weight rows, shift into its bias if it has one). Elsewhere (an option-A shortcut, a
BN fused with its activation, a group laid twice in one site) the bank applies the identity
whatever the caller passes, so the bank always equals the folded module (:mod:`.calibrate`).

Memory: the bank's activations are M times the strong model's at batch B. Without grad each
intermediate is freed as the forward goes, so peak memory is about M*B times the largest few
activations (resnet20 at 32 px: ~0.4 MB per image and module). With grad (calibration, a
gradient mask search) every activation is kept for the backward: about M*B times the strong
model's per-image activation footprint plus one extra map per site (resnet20: ~2.6 MB per
image and module, measured, so M=5, B=64 needs ~0.9 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .groups import SplitGraph, clone_graph_module

__all__ = [
    "AffineLayout",
    "BankSite",
    "ModuleBank",
    "bn_reestimation_affine",
    "create_affine_layout",
    "flat_masks",
]


@dataclass
class BankSite:
    """One mask site: ``kind`` says how its affine folds (``bn``: into the BatchNorm's weight
    and bias; ``conv``: into a conv's weight rows and bias; ``conv_nobias``: scale only;
    ``none``: not at all). ``target`` is the module folded into. ``mask_index`` [C] / ``affine_index``
    [C] give, per channel of the site's output, its position in the per-channel mask vector
    (sum of group widths) and in S."""

    node: str
    kind: str
    target: str | None
    mask_index: torch.Tensor
    affine_index: torch.Tensor


@dataclass
class AffineLayout:
    """Where every (group, site) lies in the per-site affine ``[M, S]``.

    ``entries``: ``(group index, site node, offset in S, width)`` in S order; ``scale_free`` /
    ``shift_free`` [S]: entries that fold exactly into the module (others stay identity).
    ``unit_index`` [sum of widths]: the mask entry (in K) of every channel.
    """

    sites: list[BankSite]
    entries: list[tuple[int, str, int, int]]
    size: int
    scale_free: torch.Tensor
    shift_free: torch.Tensor
    unit_index: torch.Tensor

    def signature(self) -> list[list]:
        """A JSON-able description, stored with calibrated modules to refuse another layout."""
        return [[g, site, width] for g, site, _, width in self.entries]

    def identity(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` [m, S] that change nothing."""
        return torch.ones(m, self.size), torch.zeros(m, self.size)

    def effective(
        self, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``scale``/``shift`` with the entries that do not fold set to the identity."""
        if scale is not None:
            scale = torch.where(self.scale_free.to(scale.device), scale, torch.ones_like(scale))
        if shift is not None:
            shift = torch.where(self.shift_free.to(shift.device), shift, torch.zeros_like(shift))
        return scale, shift


def _site_kind(m: nn.Module | None) -> str:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.weight is None or m.running_var is None:
            return "none"
        act = getattr(m, "act", None)  # timm BatchNormAct2d: BN, (drop,) activation in one
        return "bn_act" if act is not None and not isinstance(act, nn.Identity) else "bn"
    if isinstance(m, nn.Conv2d):
        return "conv" if m.bias is not None else "conv_nobias"
    return "none"


def create_affine_layout(sg: SplitGraph) -> AffineLayout:
    """The mask and affine index spaces of ``sg`` (see the module docstring)."""
    mask_off, k_off, parts = [], 0, []  # per-channel offsets; mask entry of every channel
    for g in sg.groups:
        mask_off.append(sum(len(p) for p in parts))
        parts.append(torch.arange(g.channels).repeat_interleave(g.unit) + k_off)
        k_off += g.channels
    unit_index = torch.cat(parts)
    entries, where, off = [], {}, 0
    for g in sg.groups:
        for site in g.sites:
            entries.append((g.index, site, off, g.width))
            where[(g.index, site)] = off
            off += g.width
    scale_free = torch.zeros(off, dtype=torch.bool)
    shift_free = torch.zeros(off, dtype=torch.bool)
    nodes = {n.name: n for n in sg.gm.graph.nodes}
    sites = []
    for site in dict.fromkeys(s for g in sg.groups for s in g.sites):
        node = nodes[site]
        mod = sg.gm.get_submodule(node.target) if node.op == "call_module" else None
        kind = _site_kind(mod)
        segs = sg.segments(site)
        twice = {gi for gi, _, _ in segs if sum(1 for s in segs if s[0] == gi) > 1}
        m_idx, a_idx = [], []
        for gi, _, width in segs:
            m_idx.append(mask_off[gi] + torch.arange(width))
            a = where[(gi, site)] + torch.arange(width)
            a_idx.append(a)
            if kind != "none" and gi not in twice:
                scale_free[a] = True
                shift_free[a] = kind in ("bn", "bn_act", "conv")
        sites.append(
            BankSite(
                site,
                kind,
                node.target if mod is not None else None,
                torch.cat(m_idx),
                torch.cat(a_idx),
            )  # fmt: skip
        )
    return AffineLayout(sites, entries, off, scale_free, shift_free, unit_index)


@dataclass
class StrongPrefix:
    """The strong model's node values before one group's first mask site (batch B)."""

    group: int
    batch: int
    values: dict  # fx.Node -> tensor (None where no later node reads it)

    def env(self, m: int) -> dict:
        """The values for M modules (each tensor repeated M times along the batch)."""
        return {
            n: (v.repeat(m, *([1] * (v.dim() - 1))) if v is not None else None)
            for n, v in self.values.items()
        }


class _Context:
    """What one bank forward passes to its site ops (a plain object: not a submodule)."""

    def __init__(self) -> None:
        self.m = 1
        self.mask: torch.Tensor | None = None  # [M, sum of widths]
        self.scale: torch.Tensor | None = None  # [M, S]
        self.shift: torch.Tensor | None = None
        self.recording = False  # BatchNorm re-estimation: normalise with batch statistics
        self.batch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sums: dict[int, list[torch.Tensor]] = {}


def _per_module(y: torch.Tensor, m: int) -> torch.Tensor:
    return y.reshape(m, y.shape[0] // m, *y.shape[1:])


def _expand(v: torch.Tensor, dims: int) -> torch.Tensor:
    """[M, C] -> [M, 1, C, 1, ...] for a [M, B, C, ...] activation of ``dims`` dims."""
    return v.reshape(v.shape[0], 1, v.shape[1], *([1] * (dims - 3)))


def _record(ctx: _Context, index: int, x: torch.Tensor) -> None:
    """Per-module batch statistics of a BatchNorm's input (recording mode)."""
    v = _per_module(x, ctx.m).detach().double()
    v = v.transpose(1, 2).reshape(ctx.m, v.shape[2], -1)  # [M, C, B*H*W]
    ctx.batch[index] = (v.mean(2), v.var(2, unbiased=False))
    acc = ctx.sums.setdefault(index, [0.0, 0.0, 0])
    acc[0] = acc[0] + v.sum(2)
    acc[1] = acc[1] + (v * v).sum(2)
    acc[2] += v.shape[2]


def _affine(ctx: _Context, index: int, bn: nn.Module | None, idx: torch.Tensor, v: torch.Tensor):
    """Module m's BN re-estimation (recording mode) and affine on ``v`` [M, B, C, ...]."""
    if ctx.recording and bn is not None:
        mean, var = ctx.batch.pop(index)
        a, b = bn_reestimation_affine(bn, mean, var)
        v = v * _expand(a.to(v), v.dim()) + _expand(b.to(v), v.dim())
    if ctx.scale is not None:
        v = v * _expand(ctx.scale[:, idx], v.dim())
    if ctx.shift is not None:
        v = v + _expand(ctx.shift[:, idx], v.dim())
    return v


class _TapOp(nn.Module):
    """Before a BatchNorm site: in recording mode, per-module batch statistics of its input."""

    def __init__(self, index: int, ctx: _Context):
        super().__init__()
        self.index = index
        object.__setattr__(self, "ctx", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.recording:
            _record(self.ctx, self.index, x)
        return x


class _BNActOp(nn.Module):
    """Replaces a call of a BN fused with its activation (timm's ``BatchNormAct2d``): the
    eval-mode BN, module m's affine (and BN re-estimation) *before* the activation, where it
    folds into the BN's weight and bias; then the BN's drop and activation."""

    def __init__(self, index: int, site: BankSite, bn: nn.Module, ctx: _Context):
        super().__init__()
        self.index = index
        self.register_buffer("affine_index", site.affine_index.clone(), persistent=False)
        object.__setattr__(self, "ctx", ctx)
        object.__setattr__(self, "bn", bn)  # the graph's module, not a submodule of this op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, bn = self.ctx, self.bn
        if ctx.recording:
            _record(ctx, self.index, x)
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        v = _affine(ctx, self.index, bn, self.affine_index, _per_module(y, ctx.m))
        return bn.act(bn.drop(v.reshape(y.shape)))


class _SiteOp(nn.Module):
    """After a mask site: module m's affine and mask on its slice of the batch."""

    def __init__(
        self, index: int, site: BankSite, bn: nn.Module | None, ctx: _Context, affine: bool
    ):
        super().__init__()
        self.index = index
        self.affine = affine  # False where the affine was applied before (a fused BN's act)
        self.register_buffer("mask_index", site.mask_index.clone(), persistent=False)
        self.register_buffer("affine_index", site.affine_index.clone(), persistent=False)
        object.__setattr__(self, "ctx", ctx)
        object.__setattr__(self, "bn", bn)  # not a submodule: the graph calls it already

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        v = _per_module(y, ctx.m)
        if self.affine:
            v = _affine(ctx, self.index, self.bn, self.affine_index, v)
        v = v * _expand(ctx.mask[:, self.mask_index], v.dim())
        return v.reshape(y.shape)


def bn_reestimation_affine(
    bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``BN_new(x) = a * BN_old(x) + b`` per channel.

    BN_old normalises with its running statistics (mu, sigma = sqrt(var + eps)), BN_new with
    ``mean``/``var`` ([..., C]; same weight gamma and bias beta). From
    ``BN(x) = gamma (x - mu) / sigma + beta``: ``a = sigma_old / sigma_new`` and
    ``b = beta (1 - a) + gamma (mu_old - mu_new) / sigma_new``; no division by gamma, so it
    holds for every channel.
    """
    mu0 = bn.running_mean.double()
    s0 = (bn.running_var.double() + bn.eps).sqrt()
    s1 = (var.double() + bn.eps).sqrt()
    gamma, beta = bn.weight.double(), bn.bias.double()
    a = s0 / s1
    b = beta * (1 - a) + gamma * (mu0 - mean.double()) / s1
    return a, b


class ModuleBank(nn.Module):
    """The strong model with M modules' masks and per-site affines, run as one batch.

    ``bank(x [B, ...], masks [M, K], scale=None, shift=None) -> logits [M, B, N]``. With
    all-ones masks and no affine each row is the strong model; with 0/1 masks row m equals
    :class:`MaskedModel` with module m's masks (and, with an affine, the module with the
    affine folded in, :func:`~md_plugin.splitter.calibrate.fold_affine`). The weights are
    frozen and BatchNorm stays in eval mode (``train()`` changes nothing); gradients flow to
    ``masks``, ``scale`` and ``shift``.
    """

    def __init__(self, sg: SplitGraph):
        super().__init__()
        self.layout = create_affine_layout(sg)
        self.groups = list(sg.groups)  # the ChannelGroups (names, widths, kernels)
        self.num_groups = len(sg.groups)
        self.mask_size = sum(g.channels for g in sg.groups)
        self._ctx = _Context()
        gm = clone_graph_module(sg)
        gm.requires_grad_(False)
        by_name = {n.name: n for n in gm.graph.nodes}
        for i, site in enumerate(self.layout.sites):
            node = by_name[site.node]
            bn = gm.get_submodule(site.target) if site.kind in ("bn", "bn_act") else None
            if site.kind == "bn":
                gm.add_submodule(f"bank_tap_{i}", _TapOp(i, self._ctx))
                src = node.args[0]
                with gm.graph.inserting_before(node):
                    tap = gm.graph.call_module(f"bank_tap_{i}", (src,))
                node.replace_input_with(src, tap)
            elif site.kind == "bn_act":  # the affine goes between the BN and its activation
                gm.add_submodule(f"bank_bnact_{i}", _BNActOp(i, site, bn, self._ctx))
                node.target = f"bank_bnact_{i}"
            op = _SiteOp(i, site, bn, self._ctx, affine=site.kind != "bn_act")
            gm.add_submodule(f"bank_site_{i}", op)
            with gm.graph.inserting_after(node):
                op = gm.graph.call_module(f"bank_site_{i}", (node,))
            node.replace_all_uses_with(op)
            op.args = (node,)
        gm.graph.lint()
        gm.recompile()
        self.gm = gm.eval()
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        # per group: the position of its first site; nothing before it depends on its masks
        self._first_site = [min(order[s] for s in g.sites) for g in sg.groups]
        self.register_buffer("unit_index", self.layout.unit_index.clone(), persistent=False)
        self.register_buffer("scale_free", self.layout.scale_free.clone(), persistent=False)
        self.register_buffer("shift_free", self.layout.shift_free.clone(), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.unit_index.device

    @property
    def affine_size(self) -> int:
        """S, the width of ``scale`` and ``shift``."""
        return self.layout.size

    def train(self, mode: bool = True) -> ModuleBank:  # BN statistics are never updated here
        super().train(mode)
        self.gm.eval()
        return self

    def forward(
        self,
        x: torch.Tensor,
        masks: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        prefix: StrongPrefix | None = None,
    ) -> torch.Tensor:
        """Logits [M, B, N] of the M modules on ``x`` (see the class docstring).

        ``prefix`` (:meth:`strong_prefix` of the same ``x``): skip the part of the network
        before ``prefix.group``'s first mask site, taking the strong model's values there;
        right only when every module keeps all channels of every other group before that
        point and has no affine there (the layer-sensitivity analysis prunes one group).
        """
        if masks.dim() != 2 or masks.shape[1] != self.mask_size:
            raise ValueError(f"masks must be [M, {self.mask_size}], got {tuple(masks.shape)}")
        m = masks.shape[0]
        for name, t in (("scale", scale), ("shift", shift)):
            if t is not None and tuple(t.shape) != (m, self.affine_size):
                raise ValueError(f"{name} must be [{m}, {self.affine_size}], got {tuple(t.shape)}")
        ctx = self._ctx
        ctx.m = m
        ctx.mask = masks.to(x.dtype)[:, self.unit_index]
        ctx.scale = (
            torch.where(self.scale_free, scale.to(x.dtype), 1.0) if scale is not None else None
        )
        ctx.shift = (
            torch.where(self.shift_free, shift.to(x.dtype), 0.0) if shift is not None else None
        )
        xs = x.unsqueeze(0).expand(m, *x.shape).reshape(m * x.shape[0], *x.shape[1:])
        try:
            if prefix is None:
                out = self.gm(xs)
            else:
                out = fx.Interpreter(self.gm).run(xs, initial_env=prefix.env(m))
        finally:
            ctx.mask = ctx.scale = ctx.shift = None
        return out.reshape(m, x.shape[0], *out.shape[1:])

    @torch.no_grad()
    def strong_prefix(self, x: torch.Tensor, group: int) -> StrongPrefix | None:
        """The strong model's values of every node before ``group``'s first mask site that a
        later node reads, on ``x`` (for :meth:`forward`'s ``prefix``); None when one of them is
        not a tensor (a batch size read inside forward would be wrong for M*B images)."""
        start = self._first_site[group]
        nodes = list(self.gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        keep = {n.name for n in nodes[:start] if any(pos[u] >= start for u in n.users)}
        ctx = self._ctx
        ctx.m, ctx.mask = 1, torch.ones(1, len(self.unit_index), device=x.device, dtype=x.dtype)
        values: dict[fx.Node, torch.Tensor | None] = {}

        class _Capture(fx.Interpreter):
            def run_node(self, n: fx.Node):
                out = super().run_node(n)
                if n.name in keep:
                    values[n] = out
                return out

        try:
            interp = _Capture(self.gm)
            interp.run(x)
        finally:
            ctx.mask = None
        if any(not isinstance(v, torch.Tensor) for v in values.values()):
            return None
        skipped = {n: values.get(n) for n in nodes[:start]}
        return StrongPrefix(group, x.shape[0], skipped)

    @torch.no_grad()
    def record_bn_statistics(
        self, batches: Sequence[torch.Tensor], masks: torch.Tensor
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per-module statistics of every folding BatchNorm's input under ``masks``.

        One pass over ``batches`` (images) as a BN in training mode does it: each BN normalises
        with the batch's statistics of its module (so later layers see re-estimated inputs) and
        the population mean and (biased) variance over all images are accumulated. Returns
        ``{site index: (mean [M, C], var [M, C])}`` (float64).
        """
        ctx = self._ctx
        ctx.recording, ctx.sums, ctx.batch = True, {}, {}
        try:
            for x in batches:
                self(x, masks)
        finally:
            ctx.recording = False
        out = {}
        for i, (s, sq, n) in ctx.sums.items():
            mean = s / n
            out[i] = (mean, (sq / n - mean * mean).clamp_min(0.0))
        ctx.sums = {}
        return out


def flat_masks(per_module: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """[M, K] float masks from per-module lists of per-group vectors."""
    return torch.stack([torch.cat([torch.as_tensor(v).float() for v in per]) for per in per_module])
