"""Per-class and many/medium/few-shot accuracy for long-tailed evaluation.

Top-1 accuracy on a balanced test set hides where a long-tailed model fails: head classes
dominate training, tail classes the errors. The convention of the long-tail literature (Liu et
al. 2019, OLTR; Kang et al. 2020) splits classes by their number of TRAINING images: many-shot
(> 100), medium-shot (20..100) and few-shot (< 20), and reports the mean per-class accuracy of
each group. Top-k accuracy is ``timm.utils.accuracy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["confusion_matrix", "per_class_accuracy", "shot_groups", "shot_accuracy"]

SHOT_GROUPS = ("many", "medium", "few")


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``[K, K]`` with rows = true class, columns = predicted class.

    ``preds`` are class indices ``[N]`` or logits ``[N, K]`` (arg-maxed). Confusion matrices
    from several batches or processes simply add up.
    """
    preds, targets = torch.as_tensor(preds), torch.as_tensor(targets)
    if preds.dim() == 2:
        preds = preds.argmax(dim=1)
    preds, targets = preds.reshape(-1).long().cpu(), targets.reshape(-1).long().cpu()
    if preds.shape != targets.shape:
        raise ValueError(f"preds and targets differ in length: {len(preds)} vs {len(targets)}")
    for name, t in (("preds", preds), ("targets", targets)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(
                f"{name} must be class indices in [0, {num_classes}), got {t.unique()}"
            )
    flat = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class (diagonal / row sum); NaN for a class without test samples."""
    confusion = torch.as_tensor(confusion)
    total = confusion.sum(dim=1).double()
    correct = confusion.diagonal().double()
    return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, math.nan))


def shot_groups(
    cls_num_list: Sequence[int], many_thr: int = 100, few_thr: int = 20
) -> dict[str, list[int]]:
    """Class indices per group: many ``n > many_thr``, medium ``few_thr <= n <= many_thr``,
    few ``n < few_thr`` (``n`` = training images of the class)."""
    groups: dict[str, list[int]] = {g: [] for g in SHOT_GROUPS}
    for c, n in enumerate(cls_num_list):
        group = "many" if n > many_thr else "few" if n < few_thr else "medium"
        groups[group].append(c)
    return groups


def shot_accuracy(
    per_class_acc: torch.Tensor | Sequence[float],
    cls_num_list: Sequence[int],
    many_thr: int = 100,
    few_thr: int = 20,
) -> dict[str, float]:
    """Mean per-class accuracy of the many/medium/few-shot groups; NaN for an empty group.

    Classes whose accuracy is NaN (no test samples) are left out of their group's mean.
    """
    acc = torch.as_tensor(per_class_acc, dtype=torch.float64).reshape(-1)
    if len(acc) != len(cls_num_list):
        raise ValueError(f"{len(acc)} per-class accuracies but {len(cls_num_list)} class counts")
    out = {}
    for group, classes in shot_groups(cls_num_list, many_thr, few_thr).items():
        vals = acc[classes]
        vals = vals[~vals.isnan()]
        out[group] = float(vals.mean()) if len(vals) else math.nan
    return out
