"""Module calibration (beyond the paper): re-estimated BatchNorm statistics and a learnt
per-channel affine at the mask sites, folded exactly into each module.

CNNSplitter's modules are not adapted after the search: a module keeps the strong model's
weights and BN statistics, although removing channels shifts every later layer's input
distribution. Calibration is a documented deviation (``--calibrate none|bn|affine``) that adapts
the cheapest possible thing, one scale and shift per kept channel and mask site:

- ``bn``: each module's BN statistics are re-estimated under its mask on *training* images of
  the split classes (the held-out images only select and measure). A BN with new statistics is
  an affine map of the old BN's output (:func:`~md_plugin.splitter.bank.bn_reestimation_affine`),
  so this is stored as a per-site affine.
- ``affine``: starting from ``bn``, all modules' scales and shifts are learnt together through the
  :class:`~md_plugin.splitter.bank.ModuleBank` (conv weights frozen, Adam) against the strong
  model's logits on the same images: the mean squared error between module m's logits of the
  split classes and the strong model's. Logit MSE, not a softmax KL: the composition compares
  raw own-class logits across modules, and a KL leaves each module's logits free up to a
  per-image constant, which would make those logits incomparable.

Both live in one storage, ``scale`` / ``shift`` [M, S] (:class:`~md_plugin.splitter.bank.AffineLayout`),
which :func:`fold_affine` folds into the producing BatchNorm's weight and bias, or into a conv's
weight rows and bias where no BN follows (SimCNN), so a calibrated module is again the strong
network with some kernels removed and some per-channel constants changed; masked and extracted
calibrated modules agree. Where nothing can carry the affine (an option-A shortcut, a BN fused
with its activation) it stays the identity.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .bank import AffineLayout, ModuleBank, bn_reestimation_affine, create_affine_layout
from .groups import SplitGraph

__all__ = [
    "CALIBRATION_MODES",
    "CalibrationConfig",
    "estimate_bn_affine",
    "fold_affine",
    "learn_affine",
    "calibrate_modules",
]

_logger = logging.getLogger(__name__)
CALIBRATION_MODES = ("none", "bn", "affine")


@dataclasses.dataclass
class CalibrationConfig:
    """``mode`` none|bn|affine; ``images``: stratified training images of the split classes;
    ``steps`` Adam steps of ``batch_size`` images (every module sees the same batch) at ``lr``."""

    mode: str = "affine"
    images: int = 500
    steps: int = 150
    lr: float = 0.01
    batch_size: int = 20
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.mode in CALIBRATION_MODES, f"--calibrate must be none|bn|affine, got {self.mode!r}"),
            (self.images >= 1 or self.mode == "none",
             f"--calibrate {self.mode} needs --calibrate-images >= 1, got {self.images}"),
            (self.steps >= 1 or self.mode != "affine",
             f"--calibrate affine needs --calibrate-steps >= 1, got {self.steps}"),
            (self.lr > 0, f"--calibrate-lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"--calibrate-batch-size must be >= 1, got {self.batch_size}"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


@torch.no_grad()
def fold_affine(
    sg: SplitGraph,
    scale: torch.Tensor,
    shift: torch.Tensor,
    layout: AffineLayout | None = None,
) -> SplitGraph:
    """A copy of ``sg`` whose modules carry one module's affine (``scale``, ``shift`` [S]).

    At a BN site ``s * BN(x) + t`` is a BN with weight ``s * gamma`` and bias ``s * beta + t``;
    at a conv site ``s * conv(x) + t`` is a conv with weight rows ``s * W`` and bias
    ``s * b + t``. Entries that cannot fold are ignored (the bank ignores them too). The
    strong model is not touched; the copy has the same graph, so masking and extraction work
    on it unchanged.
    """
    layout = layout or create_affine_layout(sg)
    s_all, t_all = layout.effective(scale.double()[None], shift.double()[None])
    s_all, t_all = s_all[0], t_all[0]
    gm = copy.deepcopy(sg.gm)
    for site in layout.sites:
        if site.kind == "none":
            continue
        m = gm.get_submodule(site.target)
        s, t = s_all[site.affine_index], t_all[site.affine_index]
        if site.kind in ("bn", "bn_act"):  # a fused BN's affine sits before its activation
            m.weight.copy_((m.weight.double() * s).to(m.weight))
            m.bias.copy_((m.bias.double() * s + t).to(m.bias))
        else:  # conv: per output channel
            m.weight.copy_(
                (m.weight.double() * s.view(-1, *[1] * (m.weight.dim() - 1))).to(m.weight)
            )
            if m.bias is not None:
                m.bias.copy_((m.bias.double() * s + t).to(m.bias))
    return dataclasses.replace(sg, gm=gm)


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


@torch.no_grad()
def estimate_bn_affine(
    bank: ModuleBank, masks: torch.Tensor, images: torch.Tensor, batch_size: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-module BN re-estimation under ``masks`` [M, K] on ``images``, as ``(scale, shift)``
    [M, S] (identity at sites that are no folding BN). One pass; see
    :meth:`ModuleBank.record_bn_statistics`."""
    dev = bank.device
    m = masks.shape[0]
    stats = bank.record_bn_statistics(
        [x.to(dev) for x in _chunks(images, batch_size)], masks.to(dev)
    )
    scale, shift = bank.layout.identity(m)
    for i, site in enumerate(bank.layout.sites):
        if i not in stats:
            continue
        bn = bank.gm.get_submodule(site.target)
        a, b = bn_reestimation_affine(bn, *stats[i])
        scale[:, site.affine_index] = a.float().cpu()
        shift[:, site.affine_index] = b.float().cpu()
    return scale, shift


def learn_affine(
    bank: ModuleBank,
    masks: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    columns: Sequence[int],
    cfg: CalibrationConfig,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Learn every module's per-site ``(scale, shift)`` [M, S] together.

    Loss: mean over modules, images and ``columns`` of (module logit - ``targets``)^2, where
    ``targets`` [n, len(columns)] are the strong model's logits of ``images``. Each step draws
    ``cfg.batch_size`` images (seeded) shared by all modules. Returns the affine and a short
    loss history (every 10% of the steps).
    """
    log = log or _logger.info
    dev = bank.device
    m = masks.shape[0]
    scale, shift = init if init is not None else bank.layout.identity(m)
    scale = scale.clone().to(dev).requires_grad_(True)
    shift = shift.clone().to(dev).requires_grad_(True)
    masks = masks.to(dev).float()
    cols = torch.as_tensor(list(columns), device=dev)
    opt = torch.optim.Adam([scale, shift], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    every = max(1, cfg.steps // 10)
    running = 0.0
    for step in range(cfg.steps):
        idx = torch.randint(len(images), (min(cfg.batch_size, len(images)),), generator=gen)
        x, t = images[idx].to(dev), targets[idx].to(dev)
        out = bank(x, masks, scale, shift)[:, :, cols]
        loss = (out - t[None]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            n = (step % every) + 1
            history.append(dict(step=step + 1, loss=running / n))
            log(f"calibrate affine: step {step + 1}/{cfg.steps} logit MSE {running / n:.4f}")
            running = 0.0
    return scale.detach().cpu(), shift.detach().cpu(), history


@torch.no_grad()
def _strong_logits(model: nn.Module, images: torch.Tensor, cols: Sequence[int], batch: int):
    dev = next(model.parameters()).device
    return torch.cat([model(x.to(dev))[:, list(cols)].cpu() for x in _chunks(images, batch)])


def calibrate_modules(
    mods: Any,
    images: torch.Tensor,
    cfg: CalibrationConfig,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Calibrate bound :class:`SplitModules` in place on training ``images`` of the split
    classes; sets ``mods.calib_scale`` / ``calib_shift`` and returns what was done (also
    stored in ``mods.options['calibration']``)."""
    cfg.validate()
    log = log or _logger.info
    info: dict[str, Any] = dict(dataclasses.asdict(cfg), images=int(len(images)))
    if cfg.mode == "none":
        mods.set_calibration(None, None)
        mods.options["calibration"] = info
        return info
    sg = mods.split_graph
    dev = next(mods._model.parameters()).device
    bank = ModuleBank(sg).to(dev)
    masks = mods.masks.float()
    n_bn = sum(s.kind in ("bn", "bn_act") for s in bank.layout.sites)
    t0 = time.perf_counter()
    if n_bn:
        scale, shift = estimate_bn_affine(bank, masks, images, max(cfg.batch_size, 100))
        log(
            f"calibrate bn: re-estimated {n_bn} "
            f"BatchNorm layers of {mods.num_modules} modules on {len(images)} training images "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    else:
        scale, shift = bank.layout.identity(mods.num_modules)
        log("calibrate bn: the model has no BatchNorm at a mask site; nothing to re-estimate")
    info["bn_s"] = time.perf_counter() - t0
    if cfg.mode == "affine":
        t0 = time.perf_counter()
        targets = _strong_logits(mods._model.eval(), images, mods.classes, 100)
        scale, shift, hist = learn_affine(
            bank, masks, images, targets, mods.classes, cfg, (scale, shift), log
        )
        info["affine_s"] = time.perf_counter() - t0
        info["loss"] = hist
    mods.set_calibration(scale, shift)
    mods.options["calibration"] = info
    return info
