"""Tiny models with hand-computable gradients, shared by the treatment and share tests."""

from __future__ import annotations

import torch
import torch.nn as nn

from md_plugin.doctor import Diagnosis, LayerDiagnosis, model_fingerprint
from md_plugin.layers import resolve_layers


class Linearish(nn.Module):
    """conv (identity, target) -> ReLU -> 4x4 mean -> fc: dz_k/dA[c,h,w] = W[k,c]/16 where A > 0.

    So relu(dz_k/dA) summed over the 16 positions is W[k] on every positive input.
    """

    def __init__(self, w: torch.Tensor):
        super().__init__()
        c = w.shape[1]
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c, w.shape[0], bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c)[:, :, None, None])
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def make_diagnosis(model: nn.Module, spec, masks: torch.Tensor, input_size) -> Diagnosis:
    """A Diagnosis whose every resolved layer carries ``masks`` [K, C] (one image per class)."""
    refs = resolve_layers(model, spec, input_size)
    layers = {r.name: LayerDiagnosis(r.name, masks.float(), masks.bool()) for r in refs}
    return Diagnosis(
        layers, torch.ones(masks.shape[0], dtype=torch.long), model_fingerprint(model, refs)
    )
