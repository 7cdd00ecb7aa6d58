"""CNNSplitter's strong SimCNN (Qi et al., ASE 2022), registered with timm as ``simcnn_cifar``.

A VGG16-like plain CNN: 13 ``conv3x3 (padding 1, bias) -> ReLU`` layers of 64, 64 | 128, 128 |
256 x 3 | 512 x 3 | 512 x 3 channels, a 2x2 max-pool after convs 2, 4, 7, 10 and 13, then
``flatten -> dropout -> FC 512 -> ReLU -> dropout -> FC 512 -> ReLU -> FC N``. No BatchNorm and
He-normal conv init, as the paper's code. It is the paper's regime for the splitter: wide layers
(100 genes per layer of 256 channels or more) and no BN, so a kept kernel set is the module.

``width_mult`` scales every conv and the two hidden FC layers (0.5 gives 32-256 channels) so the
net can be trained on a CPU; the layer count and pooling are the paper's at every width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["SimCNN"]

# (channels, max-pool after this conv)
_SIMCNN_CFG: tuple[tuple[int, bool], ...] = (
    (64, False), (64, True),
    (128, False), (128, True),
    (256, False), (256, False), (256, True),
    (512, False), (512, False), (512, True),
    (512, False), (512, False), (512, True),
)  # fmt: skip


class SimCNN(nn.Module):
    """13 conv3x3+ReLU layers with 5 max-pools and a 3-layer FC head, timm's model API."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width_mult: float = 1.0,
        img_size: int = 32,
        drop_rate: float = 0.5,
    ):
        """``drop_rate`` is the head's two dropouts (the paper's 0.5). Any other keyword is a
        TypeError, so a misspelt ``--model-kwargs`` is refused rather than ignored."""
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"simcnn_cifar needs width_mult > 0, got {width_mult}")
        if img_size % 32 != 0:
            raise ValueError(f"simcnn_cifar needs an image size divisible by 32, got {img_size}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        layers: list[nn.Module] = []
        chs, reduction = in_chans, 1
        self.feature_info = []
        for width, pool in _SIMCNN_CFG:
            out = max(1, round(width * width_mult))
            layers += [nn.Conv2d(chs, out, 3, 1, 1), nn.ReLU()]
            chs = out
            if pool:
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
                self.feature_info.append(
                    dict(num_chs=out, reduction=reduction, module=f"features.{len(layers) - 1}")
                )
        self.features = nn.Sequential(*layers)
        side = img_size // 32
        hidden = max(1, round(512 * width_mult))
        self.num_features = chs * side * side
        self.head_hidden_size = hidden
        self.pre_logits = nn.Sequential(
            nn.Dropout(drop_rate),
            nn.Linear(self.num_features, hidden),
            nn.ReLU(),
            nn.Dropout(drop_rate),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, sqrt(2 / (k*k*out))), as the paper's code
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, ""):
            raise ValueError("simcnn_cifar flattens its last map; it has no global pool")
        self.num_classes = num_classes
        self.fc = (
            nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(torch.flatten(x, 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "simcnn_cifar": dict(
            url="",
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(1, 1),
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
def simcnn_cifar(pretrained: bool = False, **kwargs) -> SimCNN:
    """CNNSplitter's strong SimCNN (VGG16-like, no BN); ``width_mult`` scales its widths."""
    if pretrained:
        raise ValueError("simcnn_cifar has no pretrained weights; use --initial-checkpoint")
    return build_model_with_cfg(
        SimCNN,
        "simcnn_cifar",
        pretrained=False,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )
