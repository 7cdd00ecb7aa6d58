"""Module heads: GradSplitter's small classifier on a module's logits, one per module, batched.

GradSplitter (Qi et al., TOSEM 2023) gives every module a head that turns the module's N logits
into one score: ``sigmoid(Linear(10, 1)(relu(Linear(N, 10)(relu(logits)))))``. The modules are
composed by the argmax over their scores, and a module alone says "my class" when its score is
above 0.5. The head is trained with the masks and belongs to the module.

All M heads live in stacked tensors (``0.weight`` [M, 10, N], ``0.bias`` [M, 10], ``2.weight``
[M, 1, 10], ``2.bias`` [M, 1]; the names of an ``nn.Sequential(Linear, ReLU, Linear)``), so M
modules' logits [M, B, N] are scored in one call and the artifact stores them as ``head.<name>``.
Calibration changes the logits a head was fitted to, so :func:`refit_heads` fits them again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bank import ModuleBank

__all__ = ["ModuleHeads", "HEAD_HIDDEN", "create_module_heads", "refit_heads"]

_logger = logging.getLogger(__name__)
HEAD_HIDDEN = 10  # GradSplitter's hidden width


class ModuleHeads(nn.Module):
    """M heads ``logits [M, B, N] -> scores [M, B]`` in (0, 1).

    ``select(i)`` gives module i's head alone (``[B, N] -> [B]``), for the patch rule.
    """

    def __init__(self, num_modules: int, num_logits: int, hidden: int = HEAD_HIDDEN):
        super().__init__()
        m, n, h = num_modules, num_logits, hidden
        self.w0 = nn.Parameter(torch.zeros(m, h, n))
        self.b0 = nn.Parameter(torch.zeros(m, h))
        self.w2 = nn.Parameter(torch.zeros(m, 1, h))
        self.b2 = nn.Parameter(torch.zeros(m, 1))

    @property
    def num_modules(self) -> int:
        return self.w0.shape[0]

    @property
    def num_logits(self) -> int:
        return self.w0.shape[2]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [M, B, N] (module i's logits in row i) -> scores [M, B]."""
        z = torch.relu(logits)
        h = torch.relu(torch.einsum("mbn,mhn->mbh", z, self.w0) + self.b0[:, None])
        return torch.sigmoid(torch.einsum("mbh,moh->mbo", h, self.w2)[..., 0] + self.b2)

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """PyTorch's ``nn.Linear`` initialisation (uniform in +-1/sqrt(fan_in) for weights and
        biases), drawn from ``generator`` so a seeded search starts from the same heads."""
        for w, b in ((self.w0, self.b0), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            w.copy_(torch.rand(w.shape, generator=generator) * 2 * bound - bound)
            b.copy_(torch.rand(b.shape, generator=generator) * 2 * bound - bound)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{'0.weight', '0.bias', '2.weight', '2.bias'}`` stacked over modules (detached)."""
        return {
            "0.weight": self.w0.detach().clone(),
            "0.bias": self.b0.detach().clone(),
            "2.weight": self.w2.detach().clone(),
            "2.bias": self.b2.detach().clone(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ModuleHeads:
        """Inverse of :meth:`tensors`; a ``ValueError`` names any missing or misshapen tensor."""
        need = ("0.weight", "0.bias", "2.weight", "2.bias")
        missing = [k for k in need if k not in t]
        if missing:
            raise ValueError(f"module heads miss {missing}")
        m, h, n = t["0.weight"].shape
        heads = cls(m, n, h)
        for k, p in zip(need, (heads.w0, heads.b0, heads.w2, heads.b2)):
            if tuple(t[k].shape) != tuple(p.shape):
                raise ValueError(f"module head tensor {k} has shape {tuple(t[k].shape)}, "
                                 f"expected {tuple(p.shape)}")  # fmt: skip
            p.data.copy_(t[k].float())
        return heads

    def select(self, i: int) -> nn.Module:
        """Module ``i``'s head alone, a copy: ``[B, N]`` logits -> ``[B]`` scores."""
        one = ModuleHeads(1, self.num_logits, self.w0.shape[1])
        for src, dst in zip((self.w0, self.b0, self.w2, self.b2), one.parameters()):
            dst.data.copy_(src.data[i : i + 1])
        return _OneHead(one)

    def extra_repr(self) -> str:
        return f"modules={self.num_modules}, logits={self.num_logits}, hidden={self.w0.shape[1]}"


class _OneHead(nn.Module):
    """One module's head on ``[B, N]`` logits (what :class:`~.patch.PatchedModel` calls)."""

    def __init__(self, heads: ModuleHeads):
        super().__init__()
        self.heads = heads

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.heads(logits[None])[0]


def create_module_heads(num_modules: int, num_logits: int, seed: int = 0) -> ModuleHeads:
    """Freshly initialised heads (seeded)."""
    heads = ModuleHeads(num_modules, num_logits)
    heads.reset(torch.Generator().manual_seed(seed))
    return heads


def refit_heads(
    mods: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> float:
    """GradSplitter's head epochs once more, on the modules as they are now (masks fixed).

    Calibration changes every module's logits after its head was fitted to the uncalibrated
    ones, so a calibrated gradient split re-fits its heads on the calibration images (labels in
    the model's output space): ``epochs`` passes of Adam at ``lr`` (GradSplitter's later head
    lr), heads only. The logits are computed once. Returns the last epoch's mean loss.
    """
    log = log or _logger.info
    row = {int(c): i for i, c in enumerate(mods.classes)}
    rows = torch.tensor([row[int(v)] for v in labels])
    bank = ModuleBank(mods.split_graph)
    scale = mods.calib_scale if mods.calibrated else None
    shift = mods.calib_shift if mods.calibrated else None
    masks = mods.masks.float()
    with torch.no_grad():
        z = torch.cat([bank(x, masks, scale, shift) for x in images.split(250)], 1)
    heads = ModuleHeads.from_tensors(mods.heads)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0, loss_sum = time.perf_counter(), 0.0
    for _ in range(epochs):
        perm, loss_sum, steps = torch.randperm(len(rows), generator=g), 0.0, 0
        for s in range(0, len(rows), batch_size):
            i = perm[s : s + batch_size]
            loss = F.cross_entropy(heads(z[:, i]).t(), rows[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
        loss_sum /= steps
    mods.heads = heads.tensors()
    log(
        f"heads re-fitted to the calibrated modules: {epochs} epochs on {len(rows)} training "
        f"images, loss {loss_sum:.4f} ({time.perf_counter() - t0:.0f} s)"
    )
    return loss_sum
