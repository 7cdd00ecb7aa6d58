"""Foreground-mask round trip for Model Doctor: workspace -> labelme -> masks -> dataset."""

from .labelme_masks import MaskReport, MaskWarning, labelme_to_masks
from .mask_store import MaskStoreWarning, load_masks
from .workspace import read_index, write_workspace

__all__ = [
    "MaskReport",
    "MaskStoreWarning",
    "MaskWarning",
    "labelme_to_masks",
    "load_masks",
    "read_index",
    "write_workspace",
]
