"""A planted network for the splitter tests: class c is recognised by channels {4c, 4c+1}."""

from __future__ import annotations

import torch
import torch.nn as nn

NUM_CLASSES = 3
WIDTH = 4 * NUM_CLASSES


class PlantedNet(nn.Module):
    """conv1 (1x1): channels 4c, 4c+1 copy input channel c; channels 4c+2, 4c+3 are constant
    "noise" (bias 2, more important by L1 than the signal). conv2 (1x1) is the identity. The
    classifier reads only the signal channels: logit c = ch(4c) + ch(4c+1). So module c needs
    one of {4c, 4c+1} in both layers, and nothing else; importance alone ranks them below the
    noise channels, so the search has to find them."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        n, width = num_classes, 4 * num_classes
        self.conv1 = nn.Conv2d(n, width, 1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 1, bias=False)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            for c in range(n):
                self.conv1.weight[4 * c, c] = 1.0
                self.conv1.weight[4 * c + 1, c] = 1.0
                self.conv1.bias[4 * c + 2] = 2.0
                self.conv1.bias[4 * c + 3] = 2.0
                self.fc.weight[c, 4 * c] = 3.0
                self.fc.weight[c, 4 * c + 1] = 3.0
            self.conv2.weight[:, :, 0, 0] = torch.eye(width)
        self.num_classes = n
        self.pretrained_cfg = {"architecture": "planted", "input_size": (n, 8, 8)}

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def planted_data(
    per_class: int = 20, seed: int = 0, num_classes: int = NUM_CLASSES
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = 0.05 * torch.rand(len(y), num_classes, 8, 8, generator=g)
    x[torch.arange(len(y)), y] += 1.0 + torch.rand(len(y), 8, 8, generator=g)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 16) -> list:
    return list(zip(x.split(size), y.split(size)))


def randomise_model(model: nn.Module, seed: int = 0, conv_bias: bool = True) -> nn.Module:
    """Non-trivial BN statistics and affine terms and (with ``conv_bias``) conv biases (eval
    mode), so a mask or an affine in the wrong place would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if conv_bias and isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.copy_(0.1 * torch.randn(m.out_channels, generator=g))
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def random_masks(sg, seed: int, p: float = 0.6) -> list[torch.Tensor]:
    """One bool mask per group keeping about ``p`` of its channels (at least one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for grp in sg.groups:
        m = torch.rand(grp.channels, generator=g) < p
        m[torch.randint(grp.channels, (1,), generator=g)] = True
        out.append(m)
    return out
