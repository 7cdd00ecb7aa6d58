"""How much of a model's true-class gradient sits on the channels a diagnosis calls irrelevant.

This is the quantity Model Doctor claims to change, measured on any images (held-out ones for
an experiment): per image, the positive true-class gradient at each target layer, summed over
space, split into the diagnosis's irrelevant and relevant channels of the image's class. The
*share* (irrelevant / total) does not change when every gradient is scaled, so it separates
"moved the gradient to the relevant channels" from "shrank every gradient"; the masses are
reported too. Predictions come from the same forward pass, so one pass gives accuracy and
gradient statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..layers import FeatureCapture, resolve_layers
from .diagnosis import Diagnosis, channel_grad

__all__ = ["gradient_shares"]


@torch.no_grad()
def _split(pos: torch.Tensor, irrelevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (pos * irrelevant).sum(1), (pos * (1 - irrelevant)).sum(1)


def gradient_shares(
    model: nn.Module,
    loader: Iterable,
    diagnosis: Diagnosis,
    *,
    grad_mode: str = "relu",
    input_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Per-image true-class gradient statistics over ``loader`` (eval mode, restored after).

    Returns tensors of length N (all layers of the diagnosis summed): ``irr_mass``, ``rel_mass``,
    ``share`` (irr / (irr + rel), 0 where both are 0), ``targets`` and ``preds``. With several
    target layers ``share`` is the mean of the per-layer shares, as in the treatment's
    ``md_irr_share``.
    """
    refs = resolve_layers(model, diagnosis.layer_names, input_size)
    device = next(model.parameters()).device
    masks = [diagnosis.layers[r.name].masks.to(device).float() for r in refs]
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("irr_mass", "rel_mass", "share", "targets", "preds")
    }
    try:
        with FeatureCapture(model, refs, graph_from_first=True) as cap:
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                with torch.no_grad():
                    logits = model(x)
                feats = cap.features()
                grads = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), feats)
                cap.clear()
                irr_t = torch.zeros(len(y), device=device)
                rel_t = torch.zeros(len(y), device=device)
                share_t = torch.zeros(len(y), device=device)
                for g, m in zip(grads, masks):
                    irr, rel = _split(channel_grad(g, grad_mode), 1 - m[y])
                    tot = irr + rel
                    share_t += torch.where(tot > 0, irr / tot.clamp_min(1e-30), 0.0)
                    irr_t += irr
                    rel_t += rel
                out["irr_mass"].append(irr_t.cpu())
                out["rel_mass"].append(rel_t.cpu())
                out["share"].append((share_t / len(masks)).cpu())
                out["targets"].append(y.cpu())
                out["preds"].append(logits.argmax(1).cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}
