"""Coupled channel groups: masked module == physically extracted network, per model family."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import md_plugin  # noqa: F401  (registers the CIFAR ResNets and simcnn_weak)
from md_plugin.splitter import (
    UnsupportedArchitecture,
    count_cost,
    create_masked_model,
    create_split_graph,
    extract_module,
)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so a mask before BN would be caught."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _random_masks(sg, seed: int, p: float = 0.5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = []
    for grp in sg.groups:
        m = torch.rand(grp.channels, generator=g) < p
        m[torch.randint(grp.channels, (1,), generator=g)] = True
        masks.append(m)
    return masks


class DepthwiseNet(nn.Module):
    """Expansion conv -> depthwise conv (tied channels) -> projection, with a residual."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.project(self.dw(self.expand(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


FAMILIES = {
    "resnet20_cifar": lambda: timm.create_model("resnet20_cifar", num_classes=10),
    "resnet32_cifar": lambda: timm.create_model("resnet32_cifar", num_classes=10),
    "resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    # vgg16_bn's conv stack with a narrow pre-logits MLP (the stock 4096-wide one takes 0.5 GB)
    "vgg16_bn": lambda: timm.create_model("vgg16_bn", num_classes=10, mlp_ratio=1 / 64),
    "simcnn_weak": lambda: timm.create_model("simcnn_weak", num_classes=6),
    "depthwise": DepthwiseNet,
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_masked_equals_extracted(name):
    torch.manual_seed(0)
    model = _randomise_bn(FAMILIES[name]())
    sg = create_split_graph(model, (3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for seed in range(2):
            masks = _random_masks(sg, seed)
            masked = create_masked_model(sg, masks)(x)
            ext = extract_module(sg, masks)
            out = ext(x)
            assert out.shape == full.shape
            torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-4)
            assert (masked - full).abs().max() > 1e-3  # the masks really changed the network
            macs, params = count_cost(ext, (3, 32, 32))
            full_macs, full_params = count_cost(model, (3, 32, 32))
            assert macs < full_macs and params < full_params
        torch.testing.assert_close(model(x), full)  # extraction left the strong model intact
        # all ones = the strong model
        ones = [torch.ones(g.channels, dtype=torch.bool) for g in sg.groups]
        torch.testing.assert_close(create_masked_model(sg, ones)(x), full)


def test_resnet20_groups_follow_the_residual_streams():
    sg = create_split_graph(timm.create_model("resnet20_cifar"), (3, 32, 32))
    streams = [g for g in sg.groups if len(g.producers) > 1]
    # stage 1: stem conv + three conv2; stages 2, 3: three conv2 (option-A shortcuts, no conv)
    assert [g.producers for g in streams] == [
        ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"],
        ["layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"],
        ["layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"],
    ]
    assert [g.channels for g in streams] == [16, 32, 64]
    inner = [g for g in sg.groups if len(g.producers) == 1]
    assert [g.producers[0] for g in inner] == [
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)
    ]
    # importance is read after the stem act and after every block's output act
    assert len(streams[0].reads) == 4 and len(streams[1].reads) == 3
    assert sg.total_kernels == 16 * 4 + 32 * 3 + 64 * 3 + 16 * 3 + 32 * 3 + 64 * 3


def test_resnet18_downsample_conv_joins_the_stream():
    sg = create_split_graph(timm.create_model("resnet18"), (3, 32, 32))
    stage2 = next(g for g in sg.groups if "layer2.0.conv2" in g.producers)
    assert set(stage2.producers) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}


def test_depthwise_is_tied_to_its_expansion():
    sg = create_split_graph(DepthwiseNet(), (3, 32, 32))
    expand = next(g for g in sg.groups if "expand.0" in g.producers)
    assert expand.producers == ["expand.0"]  # the depthwise conv adds no group of its own
    assert len(sg.groups) == 2  # stem+project stream, expansion (with the depthwise conv)


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


class SigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.act(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "net, words",
    [(ConcatNet, "cat"), (GroupedNet, "grouped convolution"), (SigmoidNet, "Sigmoid")],
)
def test_unsupported_architectures_are_refused(net, words):
    with pytest.raises(UnsupportedArchitecture, match=words) as e:
        create_split_graph(net(), (3, 8, 8))
    assert "\n" not in str(e.value)


def test_shared_activation_module_is_split_by_call():
    """CifarResNet's block calls one ReLU twice (inner and output): two different groups."""
    sg = create_split_graph(timm.create_model("resnet20_cifar"), (3, 32, 32))
    reads = {r for g in sg.groups for r in g.reads}
    assert {"layer1_0_act", "layer1_0_act_1"} <= reads
    owner = {r: g.index for g in sg.groups for r in g.reads}
    assert owner["layer1_0_act"] != owner["layer1_0_act_1"]
