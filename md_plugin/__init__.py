"""md_plugin: Model Doctor for timm."""

from . import models  # noqa: F401  (registers the CIFAR ResNets with timm)
from .version import __version__

__all__ = ["__version__"]
