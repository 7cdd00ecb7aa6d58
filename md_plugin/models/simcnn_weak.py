"""CNNSplitter's "overly simple" weak CNN (Qi et al., ASE 2022: ``SimCNNWeak``), registered with timm.

Four blocks of ``conv3x3(64, padding 1, bias) -> ReLU -> maxpool 2x2`` and one linear layer on
the flattened 64x2x2 map (256 features at 32 px). No BatchNorm, no dropout: the paper uses it as
the *weak* model whose target class a CNNSplitter module patches, so it is meant to be too small
for the task, not a good classifier.

``timm.create_model('simcnn_weak', num_classes=6)`` works after ``import md_plugin``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["SimCNNWeak"]


class SimCNNWeak(nn.Module):
    """4 x [conv3x3 ``width`` -> ReLU -> maxpool] -> flatten -> FC, with timm's model API."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        depth: int = 4,
        img_size: int = 32,
        drop_rate: float = 0.0,
    ):
        """Any other keyword is a TypeError, so a misspelt ``--model-kwargs`` is refused rather
        than ignored (as in the CIFAR ResNets)."""
        super().__init__()
        if img_size % (2**depth) != 0:
            raise ValueError(
                f"simcnn_weak needs an image size divisible by {2**depth}, got {img_size}"
            )
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        layers: list[nn.Module] = []
        chs = in_chans
        self.feature_info = []
        for i in range(depth):
            layers += [nn.Conv2d(chs, width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            chs = width
            self.feature_info.append(
                dict(num_chs=width, reduction=2 ** (i + 1), module=f"features.{3 * i + 2}")
            )
        self.features = nn.Sequential(*layers)
        side = img_size // 2**depth
        self.num_features = self.head_hidden_size = width * side * side
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, sqrt(2 / (k*k*out))), as the paper's code
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, ""):
            raise ValueError("simcnn_weak flattens its last map; it has no global pool")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "simcnn_weak": dict(
            url="",
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(2, 2),
            crop_pct=1.0,
            interpolation="bilinear",
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            first_conv="features.0",
            classifier="fc",
        )
    }
)


@register_model
def simcnn_weak(pretrained: bool = False, **kwargs) -> SimCNNWeak:
    """CNNSplitter's weak CIFAR model: 4 x (conv 64 + ReLU + pool), FC 256 -> N."""
    if pretrained:
        raise ValueError("simcnn_weak has no pretrained weights; use --initial-checkpoint")
    return build_model_with_cfg(
        SimCNNWeak,
        "simcnn_weak",
        pretrained=False,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )
