"""ModelDoctor.loss equals the naive official formulation (benchmarks/naive_reference.py).

The naive reference follows the official code: G carries 1/B (it differentiates -NLLLoss), one
``autograd.grad(create_graph=True)`` per term (three with the spatial term), per-sample loops,
alpha/B^2 overall and a spatial sum over the batch. After alpha_ours = alpha_off / B and
beta_ours = beta_off (same mask resize) the two must agree on the loss and on the parameter
gradients of the loss, with train-mode BatchNorm too: both use the batch-sum trick, so the
cross-sample BN terms are the same on both sides.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.naive_reference import NaiveModelDoctor, map_official_to_ours  # noqa: E402
from md_plugin.doctor import Diagnosis, LayerDiagnosis, model_fingerprint  # noqa: E402
from md_plugin.doctor.treatment import ModelDoctor  # noqa: E402
from md_plugin.layers import resolve_layers  # noqa: E402

K = 5
SIZE = 8


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, K)
        for bn in (self.bn1, self.bn2, self.bn3):  # non-trivial affine BN
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _setup(layers, batch, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    refs = resolve_layers(model, layers, (3, SIZE, SIZE))
    masks = {r.name: torch.rand(K, r.channels) > 0.5 for r in refs}
    diag = Diagnosis(
        {n: LayerDiagnosis(n, torch.rand(K, m.shape[1]), m) for n, m in masks.items()},
        torch.full((K,), 3),
        model_fingerprint(model, refs),
    )
    x = torch.randn(batch, 3, SIZE, SIZE)
    y = torch.randint(0, K, (batch,))
    fg = (torch.rand(batch, 1, SIZE, SIZE) > 0.4).float()
    has = torch.arange(batch) % 2 == 0
    return model, refs, masks, diag, x, y, fg, has


def _loss_and_grads(model, loss_fn, x):
    logits = model(x)
    loss, parts = loss_fn(logits)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss.detach(), parts, grads


def _assert_close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("train_bn", [True, False], ids=["train_bn", "eval_bn"])
@pytest.mark.parametrize(
    "alpha_off,beta_off", [(10.0, 0.0), (0.0, 2.0), (10.0, 2.0)], ids=["channel", "spatial", "both"]
)
@pytest.mark.parametrize("batched", [False, True], ids=["two_calls", "batched"])
def test_model_doctor_equals_naive_official(train_bn, alpha_off, beta_off, batched):
    batch = 8
    layers = ["conv2", "conv3"]
    model, refs, masks, diag, x, y, fg, has = _setup(layers, batch)
    model.train(train_bn)
    alpha, beta = map_official_to_ours(alpha_off, beta_off, batch)
    ours = ModelDoctor(
        model, diag, alpha, beta, batched=batched, input_size=(3, SIZE, SIZE), capture_eval=True
    )
    naive = NaiveModelDoctor(
        [r.module for r in refs], [masks[r.name] for r in refs], alpha_off, beta_off, resize="area"
    )
    naive.enabled = False
    l_ours, p_ours, g_ours = _loss_and_grads(model, lambda z: ours.loss(z, y, fg, has), x)
    ours.capture.enabled, naive.enabled = False, True
    l_ref, p_ref, g_ref = _loss_and_grads(model, lambda z: naive.loss(z, y, fg, has), x)
    ours.remove()
    naive.remove()

    assert l_ref.abs() > 0
    _assert_close(l_ours, l_ref)
    if alpha_off > 0:
        # ours reports the unweighted per-sample mean, the reference the official 1/B^2 sum
        _assert_close(p_ours["md_channel"] / batch, p_ref["channel"])
    if beta_off > 0:
        _assert_close(p_ours["md_spatial"], p_ref["spatial"])
    assert any(g.abs().sum() > 0 for g in g_ref)
    for g_o, g_r in zip(g_ours, g_ref):
        if g_r.abs().max() > 0 or g_o.abs().max() > 0:
            _assert_close(g_o, g_r)


def test_mapping_holds_for_a_batch_that_is_not_a_power_of_two():
    batch = 6
    model, refs, masks, diag, x, y, fg, has = _setup(["conv3"], batch, seed=1)
    model.train()
    alpha, beta = map_official_to_ours(7.0, 0.5, batch)
    ours = ModelDoctor(model, diag, alpha, beta, input_size=(3, SIZE, SIZE), capture_eval=True)
    naive = NaiveModelDoctor([refs[0].module], [masks["conv3"]], 7.0, 0.5, resize="area")
    naive.enabled = False
    l_ours, _, g_ours = _loss_and_grads(model, lambda z: ours.loss(z, y, fg, has), x)
    ours.capture.enabled, naive.enabled = False, True
    l_ref, _, g_ref = _loss_and_grads(model, lambda z: naive.loss(z, y, fg, has), x)
    _assert_close(l_ours, l_ref)
    for g_o, g_r in zip(g_ours, g_ref):
        if g_r.abs().max() > 0:
            _assert_close(g_o, g_r)


def test_official_bilinear_resize_differs_only_in_the_spatial_term():
    """The official R is a bilinear resize, ours an area resize: the channel term is unaffected."""
    batch = 8
    model, refs, masks, diag, x, y, fg, has = _setup(["conv2"], batch)
    model.train()
    mods, ms = [refs[0].module], [masks["conv2"]]
    bil = NaiveModelDoctor(mods, ms, 10.0, 1.0, resize="bilinear")
    area = NaiveModelDoctor(mods, ms, 10.0, 1.0, resize="area")
    _, p_bil = bil.loss(model(x), y, fg, has)
    _, p_area = area.loss(model(x), y, fg, has)
    _assert_close(p_bil["channel"], p_area["channel"])
    assert p_bil["spatial"] > 0 and p_area["spatial"] > 0


def test_per_layer_calls_give_the_same_loss():
    """The lab fork's one-call-per-layer style is the same loss, only slower."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    x, y = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 1, 0])
    masks = [torch.rand(3, 4) > 0.5, torch.rand(3, 4) > 0.5]
    mods = [model[0], model[2]]
    together = NaiveModelDoctor(mods, masks, alpha=1.0)
    a = together.loss(model(x), y)[0]
    together.remove()
    per_layer = NaiveModelDoctor(mods, masks, alpha=1.0, per_layer=True)
    b = per_layer.loss(model(x), y)[0]
    per_layer.remove()
    assert a.item() > 0 and torch.allclose(a, b, rtol=1e-6)
