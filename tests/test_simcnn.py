"""simcnn_cifar: the paper's SimCNN (shapes, timm registration, width multiplier) and the
splitter on it (no BatchNorm: the mask sites are the bias-carrying conv outputs)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from splitter_helpers import random_masks, randomise_model

import md_plugin  # noqa: F401  (registers simcnn_cifar)
from md_plugin.splitter import count_cost, create_masked_model, create_split_graph, extract_module

PAPER_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def _convs(m: nn.Module) -> list[nn.Conv2d]:
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)]


def test_registered_with_timm_at_the_papers_size():
    assert timm.is_model("simcnn_cifar")
    m = timm.create_model("simcnn_cifar", num_classes=10)
    assert [c.out_channels for c in _convs(m)] == PAPER_WIDTHS
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in _convs(m))
    assert sum(isinstance(x, nn.MaxPool2d) for x in m.modules()) == 5
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    macs, _ = count_cost(m, (3, 32, 32))
    assert macs == 313_725_952  # the spec's 313.7 M MACs (flops.log of the paper's code)
    assert m.pretrained_cfg["input_size"] == (3, 32, 32)


def test_width_multiplier_shapes_and_head():
    m = timm.create_model("simcnn_cifar", num_classes=5, width_mult=0.25).eval()
    assert [c.out_channels for c in _convs(m)] == [w // 4 for w in PAPER_WIDTHS]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert m.forward_features(x).shape == (2, 128, 1, 1)
        assert m(x).shape == (2, 5)
        assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 128)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    big = timm.create_model("simcnn_cifar", num_classes=5, width_mult=0.25, img_size=64)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 5) and big.num_features == 128 * 4


@pytest.mark.parametrize(
    "kw, err",
    [(dict(width_mult=0), ValueError), (dict(img_size=48), ValueError), (dict(widht=1), TypeError)],
)
def test_bad_arguments_are_refused(kw, err):
    with pytest.raises(err):
        timm.create_model("simcnn_cifar", **kw)


def test_splitter_masked_equals_extracted_on_simcnn():
    torch.manual_seed(0)
    model = randomise_model(timm.create_model("simcnn_cifar", num_classes=4, width_mult=1 / 8))
    sg = create_split_graph(model, (3, 32, 32))
    assert len(sg.groups) == 13 and all(len(g.producers) == 1 for g in sg.groups)
    assert all(g.sites == [g.producers[0].replace(".", "_")] for g in sg.groups)  # conv outputs
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for seed in range(2):
            masks = random_masks(sg, seed, p=0.5)
            masked = create_masked_model(sg, masks)(x)
            torch.testing.assert_close(extract_module(sg, masks)(x), masked, rtol=1e-4, atol=1e-4)
            assert (masked - full).abs().max() > 1e-3 * full.abs().max()
