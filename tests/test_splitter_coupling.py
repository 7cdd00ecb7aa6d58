"""Coupled channel groups: masked module == physically extracted network, per model family."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
from splitter_helpers import random_masks, randomise_model

import md_plugin  # noqa: F401  (registers the CIFAR ResNets and simcnn_weak)
from md_plugin.splitter import (
    UnsupportedArchitecture,
    count_cost,
    create_masked_model,
    create_split_graph,
    extract_module,
)
from md_plugin.splitter.masking import create_reading_model


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


class ConcatNet(nn.Module):
    """Two convs side by side: their channel spaces are laid next to each other."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


class RootNet(nn.Module):
    """DLA's root: a block's output and its input (one group, through the add) side by side."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.root = nn.Sequential(nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(x + self.block(x))
        return self.fc(self.root(torch.cat([y, x], 1)).mean((2, 3)))


FAMILIES = {
    "resnet20_cifar": lambda: timm.create_model("resnet20_cifar", num_classes=10),
    "resnet32_cifar": lambda: timm.create_model("resnet32_cifar", num_classes=10),
    "resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    # vgg16_bn's conv stack with a narrow pre-logits MLP (the stock 4096-wide one takes 0.5 GB)
    "vgg16_bn": lambda: timm.create_model("vgg16_bn", num_classes=10, mlp_ratio=1 / 64),
    "simcnn_weak": lambda: timm.create_model("simcnn_weak", num_classes=6),
    "depthwise": DepthwiseNet,
    "concat": ConcatNet,
    "concat_one_group_twice": RootNet,
    # squeeze-excitation, inverted residuals, concatenation, grouped convs (issue 23)
    "seresnet18": lambda: timm.create_model("seresnet18", num_classes=5),
    "mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=5),
    "densenet121": lambda: timm.create_model("densenet121", num_classes=5),
    "regnety_002": lambda: timm.create_model("regnety_002", num_classes=5),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_masked_equals_extracted(name):
    torch.manual_seed(0)
    model = randomise_model(FAMILIES[name](), conv_bias=False)
    sg = create_split_graph(model, (3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for seed in range(2):
            masks = random_masks(sg, seed, p=0.5)
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


class GroupedNet(nn.Module):
    """A grouped conv with 4 input and 8 output channels per group (no whole-group coupling)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16, 2)

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


class HardsigmoidNet(nn.Module):
    """hardsigmoid(0) = 0.5 feeding a conv: a removed channel would still reach it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardsigmoid()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.b(self.act(self.a(x)))).mean((2, 3)))


class SpatialGateNet(nn.Module):
    """A one-channel gate broadcast over all channels (spatial attention)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.s = nn.Conv2d(8, 1, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        return self.fc((x * torch.sigmoid(self.s(x))).mean((2, 3)))


class ChannelMeanNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        return self.fc((x * x.mean(1, keepdim=True)).mean((2, 3)))


@pytest.mark.parametrize(
    "net, words",
    [
        (GroupedNet, "grouped convolution"),
        (SigmoidNet, "Sigmoid"),
        (HardsigmoidNet, "Hardsigmoid"),
        (SpatialGateNet, "broadcasts across channels"),
        (ChannelMeanNet, "over the channels"),
    ],
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


def _owners(sg) -> dict:
    return {p: g for g in sg.groups for p in g.producers}


def test_squeeze_excitation_gate_joins_the_channels_it_scales():
    sg = create_split_graph(timm.create_model("efficientnet_b0", num_classes=5), (3, 32, 32))
    owner = _owners(sg)
    # the expand conv's channels are the gated channels (those of the expansion conv_pw) ...
    assert owner["blocks.1.0.se.conv_expand"] is owner["blocks.1.0.conv_pw"]
    # ... and the SE's inner width is a group of its own, read after its activation
    inner = owner["blocks.1.0.se.conv_reduce"]
    assert inner.producers == ["blocks.1.0.se.conv_reduce"]
    assert inner.reads == ["blocks_1_0_se_act1"]
    sites = {s for g in sg.groups for s in g.sites}
    assert not {"blocks_1_0_se_conv_expand", "blocks_1_0_se_gate"} & sites  # no mask on the gate


def test_mobilenetv3_conv_head_after_the_pool_is_head():
    sg = create_split_graph(timm.create_model("mobilenetv3_small_050", num_classes=5), (3, 32, 32))
    assert "conv_head" not in _owners(sg)  # kept whole, like vgg's pre-logits ConvMlp
    assert sg.layouts["conv_head"] == sg.layouts["classifier"] and sg.layouts["conv_head"][0] < 0


class _Record(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.seen[n.name] = out
        return out


def test_densenet_groups_lie_side_by_side_and_are_masked_after_every_consumer_bn():
    model = randomise_model(
        timm.create_model("densenet121", num_classes=5), conv_bias=False
    )  # BN only
    sg = create_split_graph(model, (3, 32, 32))
    g = _owners(sg)["features.denseblock1.denselayer1.conv2"]
    consumers = [f"features_denseblock1_denselayer{i}_norm1" for i in range(2, 7)]
    consumers.append("features_transition1_norm")
    assert g.sites == ["features_denseblock1_denselayer1_conv2", *consumers]
    assert g.reads == consumers  # its post-activation values: every consumer's BN + ReLU
    stem = _owners(sg)["features.conv0"]
    assert sg.segments("features_denseblock1_denselayer2_norm1") == [
        (stem.index, 0, 64),
        (g.index, 64, 32),
    ]
    # importance: the group's slice of every read point, spatial L1 summed
    x = torch.randn(2, 3, 32, 32)
    rec = _Record(sg.gm)
    rec.seen = {}
    with torch.no_grad():
        rec.run(x)
        _, reads = create_reading_model(sg)(x)
    want = 0
    for r in g.reads:
        _, start, width = next(s for s in sg.segments(r) if s[0] == g.index)
        want = want + rec.seen[r][:, start : start + width].abs().sum((2, 3))
    torch.testing.assert_close(reads[g.index], want)


def test_regnet_grouped_conv_keeps_whole_conv_groups():
    model = randomise_model(
        timm.create_model("regnety_002", num_classes=5), conv_bias=False
    )  # BN only
    sg = create_split_graph(model, (3, 32, 32))
    g = _owners(sg)["s1.b1.conv1.conv"]  # conv1 -> grouped conv2 (group width 8) -> SE
    assert g.unit == 8 and g.channels == 24 // 8 and g.kernels == 2 * 8
    assert "s1.b1.se.fc2" in g.producers
    masks = [torch.ones(grp.channels, dtype=torch.bool) for grp in sg.groups]
    masks[g.index] = torch.tensor([True, False, True])
    conv2 = extract_module(sg, masks).get_submodule("s1.b1.conv2.conv")
    assert (conv2.groups, conv2.in_channels, conv2.out_channels) == (2, 16, 16)
    _, reads = create_reading_model(sg)(torch.randn(2, 3, 32, 32))
    assert reads[g.index].shape == (2, 3)  # importance per conv group


def test_a_group_may_lie_twice_in_a_concatenation():
    sg = create_split_graph(RootNet(), (3, 8, 8))
    stream = _owners(sg)["stem.0"]
    assert stream.producers == ["stem.0", "block.0"]
    assert [(gi, start) for gi, start, _ in sg.segments("cat")] == [
        (stream.index, 0),
        (stream.index, 8),
    ]
