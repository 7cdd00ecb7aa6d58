"""CNNSplitter: split a strong CNN into per-class modules and patch a weak model's target class."""

from .patch import PatchedModel, evaluate_patch, own_class_range, tc_metrics

__all__ = ["PatchedModel", "evaluate_patch", "own_class_range", "tc_metrics"]
