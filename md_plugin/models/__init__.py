"""Model definitions registered with timm (import registers them)."""

from .cifar_resnet import CifarResNet

__all__ = ["CifarResNet"]
