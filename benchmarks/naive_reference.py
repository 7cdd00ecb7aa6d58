"""Naive reference of the official Model Doctor treatment loss, written from the formulation.

Source: the project spec (``model-doctor-spec.md`` section 2, the official ``grad_constraint.py``
as described there), NOT from ``md_plugin``. It is deliberately as unoptimised as the official
code is, so that it serves two purposes:

* an independent numerical reference for ``md_plugin.doctor.treatment.ModelDoctor``
  (``tests/test_naive_reference.py``), and
* the "official cost" baseline in ``benchmarks/bench_treatment.py``.

Formulation (A = output of a hooked conv, z = raw logits, B = batch size):

* t'_b = 2nd-ranked class if the top-1 is right, else the (wrong) top-1; found with a per-sample
  Python loop (one host sync per sample, as the official code does).
* G(k) = dA of -NLLLoss(z, k) = (1/B) * sum_b z[b, k_b]: a single-logit gradient that carries a
  1/B factor. Every term calls ``torch.autograd.grad(..., create_graph=True)`` on its own: one
  call for G(t'), one for G(y) and, with the spatial term, a third one for G(y) again.
* P_b[c] = sum_hw relu(G(t'))_b[c],  N_b[c] = sum_hw relu(G(y))_b[c]
* L_c = alpha * (1/B) * sum_b [sum_c P_b[c] M[t'_b, c] + sum_c N_b[c] (1 - M[y_b, c])]
  with two per-sample Python loops (as the official ``_loss_channel``), so the effective weight
  of the sum of per-sample gradients is alpha / B^2.
* L_s = beta * sum_{b,c,h,w} |(1 - R(m_b)) * G(y)_b|, summed over the batch (not averaged);
  R resizes the foreground mask (1 = object) to H x W. The official code uses the bilinear
  ``transforms.Resize``; ``resize="area"`` swaps in area interpolation, which is what
  ``md_plugin`` uses, for exact comparisons. Samples without a mask get an all-foreground mask
  (zero spatial loss), which is what the official loader intends for unannotated images.

Mapping to ``md_plugin`` (per-sample normalised, no 1/B inside G):
``alpha_md_plugin = alpha_official / B`` and ``beta_md_plugin = beta_official``.
Several hooked layers are summed (the official code hooks one layer only); by default one
``autograd.grad`` call per term covers all of them, ``per_layer=True`` makes one call per layer
and term, as the lab fork does (2 * L calls for L layers, model-doctor-spec.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NaiveModelDoctor", "map_official_to_ours"]


def map_official_to_ours(alpha_off: float, beta_off: float, batch_size: int) -> tuple[float, float]:
    """(alpha, beta) for ``md_plugin.ModelDoctor`` that give the official loss at this batch size."""
    return alpha_off / batch_size, beta_off


class NaiveModelDoctor:
    """Official-style Model Doctor loss on the outputs of ``modules`` (forward hooks).

    ``masks``: one [K, C] tensor per module (1/True = channel relevant to class k).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        masks: Sequence[torch.Tensor],
        alpha: float,
        beta: float = 0.0,
        resize: str = "bilinear",
        per_layer: bool = False,
    ):
        if len(modules) != len(masks):
            raise ValueError("one mask per hooked module")
        if resize not in ("bilinear", "area"):
            raise ValueError(f"resize must be bilinear or area, got {resize!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.resize = resize
        self.per_layer = per_layer  # the lab fork's style: one gradient call per layer and term
        self.masks = [m.float() for m in masks]
        self.enabled = True
        self.features: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [mod.register_forward_hook(self._hook(i)) for i, mod in enumerate(modules)]

    def _hook(self, i: int):
        def hook(_mod, _inp, out):
            if self.enabled:
                self.features[i] = out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.features = [None] * len(self.features)

    # -- the official steps, one by one -------------------------------------------------------
    @staticmethod
    def confusing_labels(logits: torch.Tensor, targets: torch.Tensor) -> list[int]:
        out = []
        for b in range(logits.shape[0]):
            top2 = torch.topk(logits[b].detach(), 2).indices
            first, second = int(top2[0]), int(top2[1])
            out.append(second if first == int(targets[b]) else first)
        return out

    def _grads(self, logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        # -NLLLoss on raw logits = (1/B) * sum_b z[b, labels_b]
        objective = -F.nll_loss(logits, labels)
        feats = [f for f in self.features if f is not None]
        if self.per_layer:  # 2 * L calls for L layers, each backward through the whole head
            return [torch.autograd.grad(objective, f, create_graph=True)[0] for f in feats]
        return list(torch.autograd.grad(objective, feats, create_graph=True))

    @staticmethod
    def _channel_sums(g: torch.Tensor) -> torch.Tensor:
        g = F.relu(g)
        return g.sum(dim=(2, 3)) if g.dim() == 4 else g

    def _resize(self, m: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.resize == "area":
            return F.interpolate(m, size=tuple(size), mode="area")
        # torchvision.transforms.Resize on a float tensor: bilinear with antialias
        return F.interpolate(
            m, size=tuple(size), mode="bilinear", align_corners=False, antialias=True
        )

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        fg_masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if any(f is None for f in self.features):
            raise RuntimeError("a hooked module did not run in the last forward pass")
        b_size = logits.shape[0]
        t_conf = self.confusing_labels(logits, targets)
        t_conf_t = torch.tensor(t_conf, device=logits.device)
        labels = [int(v) for v in targets]

        # two separate create_graph calls for the channel term
        g_conf = self._grads(logits, t_conf_t)
        g_true = self._grads(logits, targets)
        loss_c = logits.new_zeros(())
        for i, m in enumerate(self.masks):
            pos = self._channel_sums(g_conf[i])  # P [B, C]
            neg = self._channel_sums(g_true[i])  # N [B, C]
            term = logits.new_zeros(())
            for b in range(b_size):  # confusing class on its own relevant channels
                term = term + (pos[b] * m[t_conf[b]]).sum()
            for b in range(b_size):  # true class on the channels irrelevant to it
                term = term + (neg[b] * (1.0 - m[labels[b]])).sum()
            loss_c = loss_c + term / b_size
        total = self.alpha * loss_c
        parts = {"channel": loss_c.detach(), "spatial": logits.new_zeros(())}

        if self.beta > 0 and fg_masks is not None:
            if has_mask is None:
                has_mask = torch.ones(b_size, dtype=torch.bool, device=logits.device)
            g_sp = self._grads(logits, targets)  # third create_graph call: G(y) again
            fg = fg_masks.float().clone()
            fg[~has_mask.to(fg.device)] = 1.0  # unannotated: all foreground, zero loss
            loss_s = logits.new_zeros(())
            for g in g_sp:
                if g.dim() != 4:
                    continue
                bg = 1.0 - self._resize(fg, g.shape[-2:])
                loss_s = loss_s + (bg * g).abs().sum()
            total = total + self.beta * loss_s
            parts["spatial"] = loss_s.detach()
        self.features = [None] * len(self.features)
        return total, parts
