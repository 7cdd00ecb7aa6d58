"""Model definitions registered with timm (import registers them)."""

from .cifar_resnet import CifarResNet
from .simcnn import SimCNN
from .simcnn_weak import SimCNNWeak

__all__ = ["CifarResNet", "SimCNN", "SimCNNWeak"]
