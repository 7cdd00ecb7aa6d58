"""gradient_shares: hand values, scale invariance, agreement with the treatment's statistic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_models import Linearish, make_diagnosis

import md_plugin  # noqa: F401
from md_plugin.doctor.shares import gradient_shares
from md_plugin.doctor.treatment import ModelDoctor


def test_gradient_shares_hand_values_and_scale_invariance():
    torch.manual_seed(0)
    K, C = 3, 4
    W = torch.rand(K, C) + 0.2
    M = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    x = torch.rand(7, C, 4, 4) + 0.1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    Wn, Mn = W.double().numpy(), M.numpy().astype(float)
    irr = np.array([(Wn[k] * (1 - Mn[k])).sum() for k in y.tolist()])
    rel = np.array([(Wn[k] * Mn[k]).sum() for k in y.tolist()])
    for scale in (1.0, 0.01):
        model = Linearish(W * scale).train()
        r = gradient_shares(
            model, loader, make_diagnosis(model, "conv", M, (C, 4, 4)), input_size=(C, 4, 4)
        )
        assert model.training  # mode restored
        assert r["irr_mass"].numpy() == pytest.approx(scale * irr, rel=1e-5)
        assert r["rel_mass"].numpy() == pytest.approx(scale * rel, rel=1e-5)
        assert r["share"].numpy() == pytest.approx(irr / (irr + rel), rel=1e-5)  # scale-free
        assert r["targets"].tolist() == y.tolist()
        assert r["preds"].tolist() == model(x).argmax(1).tolist()


def test_gradient_shares_agree_with_the_treatment_statistic():
    torch.manual_seed(1)
    W = torch.randn(3, 5)  # mixed signs: some gradients are not positive
    M = torch.rand(3, 5) > 0.5
    model = Linearish(W).eval()
    x = torch.rand(6, 5, 4, 4) + 0.1
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    diag = make_diagnosis(model, "conv", M, (5, 4, 4))
    r = gradient_shares(model, [(x, y)], diag, input_size=(5, 4, 4))
    md = ModelDoctor(model, diag, alpha=0.0, monitor=True, capture_eval=True, input_size=(5, 4, 4))
    parts = md.loss(model(x), y)[1]
    assert float(r["share"].mean()) == pytest.approx(parts["md_irr_share"].item(), rel=1e-5)
    assert float(r["irr_mass"].mean()) == pytest.approx(parts["md_irr_mass"].item(), rel=1e-5)
