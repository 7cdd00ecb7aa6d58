"""Patching a weak model's target class with a CNNSplitter module (spec section 6).

The paper's rule, exactly (``experiments/patch/apply_patch.py``): run the weak model and take its
softmax ``p``; run the target class's module (a masked copy of the strong model, or anything that
returns the strong model's logits) and min-max normalise its *own-class* logit with the range
recorded on that class's validation images, ``m' = (z - lo) / (hi - lo)``, unclipped; put ``m'``
in place of the weak model's target-class probability and predict the argmax. Equivalently, the
target class wins iff ``m' > max_{j != TC} p_j``. Nothing is trained or tuned.

A module of the gradient search (GradSplitter) carries a trained head that scores its logits
in (0, 1); given ``head``, that score is ``m'`` instead of the min-max-normalised own logit.

:class:`PatchedModel` is a plain ``nn.Module`` (its output's argmax is the patched prediction),
so the trainer's ``evaluate``, ``torch.save(model.state_dict())`` and ``load_state_dict`` work on
it as on any classifier. :func:`tc_metrics` gives the paper's numbers: target-class precision,
recall and F1 (TC vs rest) and accuracy on the non-target images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = [
    "PatchedModel",
    "tc_metrics",
    "evaluate_patch",
    "own_class_range",
]


class PatchedModel(nn.Module):
    """A weak classifier whose ``target_class`` score comes from a strong model's module.

    Args:
        weak: the weak model, ``x -> [B, N_weak]`` logits.
        module: ``x -> [B, N_strong]`` logits of the strong model's module for the target class
            (a masked strong model, the whole strong model, ...).
        target_class: the target class's index in the weak model's outputs (the paper always
            appends it last: ``-1``).
        module_class: the same class's index in the *strong* model's outputs.
        value_range: ``(lo, hi)``, the module's own-class logit range on that class's validation
            images (CNNSplitter's ``min_max`` mode); ``hi > lo``. Unused with ``head``.
        head: a GradSplitter module head, ``[B, N_strong]`` logits -> ``[B]`` scores in (0, 1):
            its score replaces the weak TC probability (no min-max normalisation).

    ``forward`` returns the weak softmax with column ``target_class`` replaced by the normalised
    module logit: scores, not probabilities (the column may leave [0, 1] and rows need not sum
    to 1); their argmax is the patched prediction.
    """

    def __init__(
        self,
        weak: nn.Module,
        module: nn.Module,
        target_class: int,
        module_class: int,
        value_range: tuple[float, float] | None = None,
        head: nn.Module | None = None,
    ):
        super().__init__()
        lo, hi = (0.0, 1.0) if head is not None else (float(v) for v in value_range or (0, 0))
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
            raise ConfigError(
                f"the module's own-class logit range must be finite with max > min, got ({lo}, {hi})"
            )
        if module_class < 0:
            raise ConfigError(f"module_class must be >= 0, got {module_class}")
        self.weak = weak
        # not "module": checkpoint loaders strip a "module." (DDP) prefix from state-dict keys
        self.tc_module = module
        self.tc_head = head
        self.target_class = int(target_class)
        self.module_class = int(module_class)
        self.register_buffer("value_range", torch.tensor([lo, hi], dtype=torch.float64))

    def _tc_index(self, num_classes: int) -> int:
        tc = self.target_class
        if not -num_classes <= tc < num_classes:
            raise ConfigError(
                f"target class {tc} is out of range for a weak model with {num_classes} outputs"
            )
        return tc % num_classes

    def module_score(self, x: torch.Tensor) -> torch.Tensor:
        """``m'``, [B]: the module's own-class logit min-max normalised with the stored range, or
        with a head, the head's score of the module's logits."""
        z = self.tc_module(x)
        if z.dim() != 2 or not -z.shape[1] <= self.module_class < z.shape[1]:
            raise ConfigError(
                f"module class {self.module_class} is out of range for a module with "
                f"{z.shape[-1]} outputs"
            )
        if self.tc_head is not None:
            return self.tc_head(z).float()
        lo, hi = self.value_range.to(z.device)
        return ((z[:, self.module_class].double() - lo) / (hi - lo)).to(torch.float32)

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weak logits, m')``: both halves of the rule, for before/after evaluation in one pass."""
        return self.weak(x), self.module_score(x)

    @staticmethod
    def combine(weak_logits: torch.Tensor, m: torch.Tensor, target_class: int) -> torch.Tensor:
        """The rule itself: softmax of the weak logits with column ``target_class`` set to ``m'``."""
        p = torch.softmax(weak_logits.float(), dim=1)
        tc = target_class % p.shape[1]
        return torch.cat([p[:, :tc], m.to(p).unsqueeze(1), p[:, tc + 1 :]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, m = self.forward_parts(x)
        return self.combine(logits, m, self._tc_index(logits.shape[1]))

    def extra_repr(self) -> str:
        lo, hi = self.value_range.tolist()
        if self.tc_head is not None:
            return f"target_class={self.target_class}, module_class={self.module_class}, head score"
        return (
            f"target_class={self.target_class}, module_class={self.module_class}, "
            f"value_range=({lo:.4g}, {hi:.4g})"
        )


def tc_metrics(
    pred: torch.Tensor | Iterable[int], target: torch.Tensor | Iterable[int], target_class: int
) -> dict[str, Any]:
    """Target-class precision, recall and F1 (TC vs rest) and non-TC accuracy, in percent.

    ``non_tc_acc`` is the accuracy on images whose label is not the target class, with every
    output allowed (a non-TC image predicted as the TC counts as wrong), as in the paper's
    ``apply_patch_for_non_tc.py``. A ratio with an empty denominator is 0 (scikit-learn's
    ``zero_division=0``); ``f1`` is 0 when precision + recall is 0.
    """
    p = torch.as_tensor(pred).long().flatten()
    t = torch.as_tensor(target).long().flatten()
    if p.shape != t.shape:
        raise ValueError("pred and target differ in length")
    is_tc, said_tc = t == target_class, p == target_class
    tp = int((is_tc & said_tc).sum())
    fp = int((~is_tc & said_tc).sum())
    fn = int((is_tc & ~said_tc).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    n_non = int((~is_tc).sum())
    non_tc = float(((p == t) & ~is_tc).sum()) / n_non if n_non else 0.0
    return {
        "tc_precision": 100.0 * prec,
        "tc_recall": 100.0 * rec,
        "tc_f1": 100.0 * f1,
        "non_tc_acc": 100.0 * non_tc,
        "acc": 100.0 * float((p == t).float().mean()) if len(t) else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_tc": int(is_tc.sum()),
        "n_non_tc": n_non,
    }


@torch.no_grad()
def evaluate_patch(
    patched: PatchedModel, loader: Iterable, device: torch.device | str | None = None
) -> dict[str, dict[str, Any]]:
    """``{'before': metrics, 'after': metrics}`` on ``loader`` in one pass (weak vs patched).

    ``loader`` yields ``(images, labels)`` with labels in the weak model's class space.
    """
    was = patched.training
    patched.eval()
    dev = torch.device(device) if device is not None else next(patched.parameters()).device
    before, after, labels = [], [], []
    tc = None
    for batch in loader:
        x, y = batch[0].to(dev), batch[1]
        logits, m = patched.forward_parts(x)
        tc = patched._tc_index(logits.shape[1])
        before.append(logits.argmax(1).cpu())
        after.append(PatchedModel.combine(logits, m, tc).argmax(1).cpu())
        labels.append(torch.as_tensor(y).cpu())
    patched.train(was)
    if tc is None:
        raise ConfigError("the evaluation set is empty")
    y = torch.cat(labels)
    return {
        "before": tc_metrics(torch.cat(before), y, tc),
        "after": tc_metrics(torch.cat(after), y, tc),
    }


@torch.no_grad()
def own_class_range(
    model: nn.Module, loader: Iterable, cls: int, device: torch.device | str | None = None
) -> tuple[float, float]:
    """``(min, max)`` of ``model(x)[:, cls]`` over the images of ``loader`` labelled ``cls``.

    CNNSplitter's ``min_max`` range of a module's own-class logit on its class's validation
    images (``module_tools.py``); used here for modules built outside the search, e.g. the whole
    strong model as a baseline.
    """
    was = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    lo, hi, n = math.inf, -math.inf, 0
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1])
        keep = y == cls
        if not keep.any():
            continue
        z = model(x[keep].to(dev))[:, cls].double()
        lo, hi, n = min(lo, float(z.min())), max(hi, float(z.max())), n + int(keep.sum())
    model.train(was)
    if n < 2 or hi <= lo:
        raise ConfigError(
            f"class {cls} needs at least two validation images with different logits for a "
            f"min-max range (found {n})"
        )
    return lo, hi
