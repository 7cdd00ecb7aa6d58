"""Layer specs resolve to the modules that really run, on timm, torchvision and CIFAR models."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import md_plugin  # noqa: F401
from md_plugin.errors import ConfigError
from md_plugin.layers import FeatureCapture, resolve_layers

S32 = (3, 32, 32)


def _names(model, spec, size=S32):
    return [r.name for r in resolve_layers(model, spec, size)]


@pytest.mark.parametrize(
    "model_name, spec, expected",
    [
        # at 32 px resnet18's layer4 map is 1x1, so the last conv with a spatial map is layer3's
        ("resnet18", "last_conv", ["layer3.1.conv2"]),
        ("resnet18", "conv:-2", ["layer3.1.conv1"]),
        ("resnet18", "layer3.*.conv2", ["layer3.0.conv2", "layer3.1.conv2"]),
        # registration order would give pre_logits.fc2 (a 1x1 head conv): wrong
        ("vgg16_bn", "last_conv", ["features.40"]),
        ("vgg16_bn", "penultimate_fc", ["pre_logits.fc2"]),
        ("vgg16_bn", "fc:-2", ["pre_logits.fc2"]),
        # registration order would give the 1x1-conv MLP of the last block, whose map is 1x1
        ("convnext_atto", "last_conv", ["stages.2.blocks.5.mlp.fc2"]),
        # conv_head runs after the pool: an FC, not the last conv
        ("mobilenetv3_small_100", "last_conv", ["blocks.4.0.conv_pw"]),
        ("mobilenetv3_small_100", "penultimate_fc", ["conv_head"]),
        ("resnet32_cifar", "last_conv", ["layer3.4.conv2"]),
        ("resnet32_cifar", "layer3.4.conv2", ["layer3.4.conv2"]),
        ("resnet32_cifar", "layer2.4.conv2,last_conv", ["layer2.4.conv2", "layer3.4.conv2"]),
        ("resnet20_cifar", "conv:-1", ["layer3.2.conv2"]),
        ("resnet56_cifar", "layer1.*.conv2", [f"layer1.{i}.conv2" for i in range(9)]),
    ],
)
def test_specs_resolve(model_name, spec, expected):
    m = timm.create_model(model_name, num_classes=10)
    assert _names(m, spec) == expected


def test_resnet18_last_conv_at_imagenet_size_is_layer4():
    m = timm.create_model("resnet18", num_classes=10, zero_init_last=False)
    refs = resolve_layers(m, "last_conv", (3, 64, 64))
    assert refs[0].name == "layer4.1.conv2" and refs[0].out_shape == (2, 512, 2, 2)
    assert refs[0].channels == 512 and refs[0].spatial


def test_torchvision_vgg_conv_and_fc():
    m = torchvision.models.vgg16(num_classes=10)
    assert _names(m, "last_conv") == ["features.28"]
    ref = resolve_layers(m, "penultimate_fc", S32)[0]
    assert ref.name == "classifier.3" and not ref.spatial and ref.channels == 4096


def test_bad_specs_error_with_suggestions():
    m = timm.create_model("resnet32_cifar")
    with pytest.raises(ConfigError, match=r"nearby names: .*layer3\.4\.conv2"):
        resolve_layers(m, "layer3.4.conv3")
    with pytest.raises(ConfigError, match="matches no module that runs"):
        resolve_layers(m, "layer9.*")
    with pytest.raises(ConfigError, match="no penultimate FC"):
        resolve_layers(m, "penultimate_fc")
    with pytest.raises(ConfigError, match="classifier output"):
        resolve_layers(m, "fc:-1")
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers(m, "conv:-99")
    with pytest.raises(ConfigError, match="empty"):
        resolve_layers(m, [])


def test_zero_init_last_bn_warns():
    m = timm.create_model("resnet18", num_classes=10)  # zero_init_last=True by default
    with pytest.warns(UserWarning, match="zero_init_last"):
        resolve_layers(m, "layer4.1.conv2", (3, 64, 64))
    m2 = timm.create_model("resnet18", num_classes=10, zero_init_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_layers(m2, "layer4.1.conv2", (3, 64, 64))


class _InplaceHead(nn.Module):
    """fc1 -> ReLU(inplace) -> fc2: a hook on fc1 sees a tensor the ReLU later overwrites."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_capture_survives_inplace_ops_and_gives_preactivation_gradient():
    torch.manual_seed(0)
    m = _InplaceHead()
    ref = resolve_layers(m, "fc1", (4,))
    x = torch.randn(5, 4)
    with FeatureCapture(m, ref) as cap:
        out = m(x)
        (a,) = cap.features()
        g = torch.autograd.grad(out[:, 0].sum(), a)[0]
    pre = m.fc1(x)
    # analytic: dz0/d(pre) = W2[0] * 1[pre > 0]
    expected = m.fc2.weight[0].detach() * (pre > 0)
    assert torch.allclose(a, pre.detach())  # not rebased onto the ReLU output
    assert torch.allclose(g, expected)


def test_capture_keeps_first_call_under_grad_checkpointing():
    m = timm.create_model("resnet18", num_classes=10, zero_init_last=False)
    m.set_grad_checkpointing(True)
    m.train()
    refs = resolve_layers(m, "layer3.1.conv2", (3, 64, 64))
    calls = []
    with FeatureCapture(m, refs) as cap:
        refs[0].module.register_forward_hook(lambda *_: calls.append(1))
        out = m(torch.randn(2, 3, 64, 64))
        (a,) = cap.features()
        g = torch.autograd.grad(out[:, 1].sum(), a, create_graph=True)[0]
        g.abs().sum().backward()
    assert len(calls) >= 2  # recomputation fired the hook again...
    assert g.shape == a.shape and a.grad_fn is not None  # ...but the first capture was kept


def test_missing_layer_in_forward_is_reported():
    m = timm.create_model("resnet20_cifar")
    refs = resolve_layers(m, "layer3.2.conv2")
    with FeatureCapture(m, refs) as cap:
        with pytest.raises(RuntimeError, match="did not run"):
            cap.features()


def test_graph_from_first_records_nothing_below_the_targets():
    """Diagnosis mode: same gradients, but the first target is a leaf (no graph below it)."""
    torch.manual_seed(0)
    m = timm.create_model("resnet20_cifar").eval()
    refs = resolve_layers(m, "layer2.2.conv2,layer3.2.conv2")
    x = torch.randn(3, 3, 32, 32)
    with FeatureCapture(m, refs) as cap:
        out = m(x)
        ref_grads = torch.autograd.grad(out[:, 2].sum(), cap.features())
    with FeatureCapture(m, refs, graph_from_first=True) as cap:
        with torch.no_grad():
            out2 = m(x)
        first, second = cap.features()
        assert first.grad_fn is None and first.requires_grad  # a leaf: nothing recorded below
        assert second.grad_fn is not None
        grads = torch.autograd.grad(out2[:, 2].sum(), [first, second])
    assert torch.is_grad_enabled()
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6)
