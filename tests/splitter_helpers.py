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

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(NUM_CLASSES, WIDTH, 1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(WIDTH, WIDTH, 1, bias=False)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTH, NUM_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            for c in range(NUM_CLASSES):
                self.conv1.weight[4 * c, c] = 1.0
                self.conv1.weight[4 * c + 1, c] = 1.0
                self.conv1.bias[4 * c + 2] = 2.0
                self.conv1.bias[4 * c + 3] = 2.0
                self.fc.weight[c, 4 * c] = 3.0
                self.fc.weight[c, 4 * c + 1] = 3.0
            self.conv2.weight[:, :, 0, 0] = torch.eye(WIDTH)
        self.num_classes = NUM_CLASSES
        self.pretrained_cfg = {"architecture": "planted", "input_size": (NUM_CLASSES, 8, 8)}

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def planted_data(per_class: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = 0.05 * torch.rand(len(y), NUM_CLASSES, 8, 8, generator=g)
    x[torch.arange(len(y)), y] += 1.0 + torch.rand(len(y), 8, 8, generator=g)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 16) -> list:
    return list(zip(x.split(size), y.split(size)))
