"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2) registered with timm.

The 6n+2 design used throughout the long-tailed CIFAR literature (LDAM-DRW, BBN, MiSLAS):
a 3x3 stem with 16 channels, three stages of n BasicBlocks with 16/32/64 channels, global
average pooling and a linear classifier. Shortcuts that change shape use "option A" (stride-2
subsampling plus zero channel padding), so resnet32 has 0.46M parameters like the reference.

Registering with ``timm.models.register_model`` makes ``timm.create_model('resnet32_cifar')``
and ``--model resnet32_cifar`` work wherever a timm name works. Importing ``md_plugin`` is
enough to register them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

__all__ = ["CifarResNet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample spatially and zero-pad the new channels."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU()
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = ShortcutA(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.drop_path(self.bn2(self.conv2(out)))
        # out-of-place add: a hook on bn2 must not see a tensor modified in place
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with timm's model API (forward_features/forward_head)."""

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bn_momentum: float | None = None,
        bn_eps: float | None = None,
    ):
        """``drop_path_rate`` is the stochastic-depth rate of the last block, linearly rising
        from 0 over the blocks as in timm's ResNet; ``bn_momentum``/``bn_eps`` set every
        BatchNorm (PyTorch's convention, default 0.1/1e-5). Any other keyword is a TypeError,
        so a misspelt or unsupported ``--model-kwargs`` is refused rather than ignored."""
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        dpr = [drop_path_rate * i / max(3 * n - 1, 1) for i in range(3 * n)]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        in_chs = widths[0]
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_chs, w, stride, drop_path=dpr[i * n + j]))
                in_chs = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=w, reduction=2**i, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                if bn_momentum is not None:
                    m.momentum = bn_momentum
                if bn_eps is not None:
                    m.eps = bn_eps

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's ``--grad-checkpointing``: recompute each residual block's activations in the
        backward pass instead of keeping them (timm's ``checkpoint_seq``, one block a segment;
        the stem stays outside, so a hook on a block's leaf module captures its first call)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return dict(
        url="",
        num_classes=10,
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        first_conv="conv1",
        classifier="fc",
        **kwargs,
    )


default_cfgs = generate_default_cfgs({f"resnet{d}_cifar": _cfg() for d in (20, 32, 44, 56, 110)})


def _create(variant: str, depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; use --initial-checkpoint")
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained=False,
        depth=depth,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet44_cifar", 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("resnet110_cifar", 110, pretrained, **kwargs)
