"""Pick the training images most worth a hand-drawn foreground mask.

Model Doctor's spatial term only helps where the model is unsure, so a person should annotate
low-confidence images, not random ones. The confidence used is the softmax probability of the
TRUE class. Per class we keep images with confidence in ``[low, high)``, lowest first: the
least certain images that the model still mostly gets right.

``misclassified_first=True`` follows the official Model Doctor ordering instead: every image of
the class gets the score ``+conf(true)`` if it is classified correctly and ``-conf(pred)`` if it
is not, lowest first. So confidently wrong images lead, then less confidently wrong ones, then
the in-band correct ones by rising confidence. Misclassified images are taken whatever their
true-class confidence; correct ones still need to be in ``[low, high)``.

Confidences are computed in float64, and confidently misclassified images are ordered by the
predicted class's log-odds ``z_pred - logsumexp_{k != pred} z_k`` (monotone in its softmax
probability, but it does not saturate at 1.0 as a float32 softmax does for a trained network:
the official ordering then ties). Remaining ties are broken by dataset index, so the selection
is deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import RandomSampler

from ..errors import ConfigError, DataError
from .diagnosis import true_class_log_odds

__all__ = ["SiftRecord", "sift_low_confidence"]


@dataclass(frozen=True)
class SiftRecord:
    """One selected image; ``confidence`` is the softmax probability of the true class."""

    index: int
    label: int
    pred: int
    confidence: float
    correct: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(num_classes: int, per_class: int, low: float, high: float) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class <= 0:
        raise ConfigError(f"per_class must be a positive integer, got {per_class!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not (0.0 <= low < high <= 1.0):
        raise ConfigError(f"need 0 <= low < high <= 1, got low={low}, high={high}")


def _score(rec: SiftRecord, pred_log_odds: float) -> tuple[int, float]:
    """Official order, lowest first: wrong images by -confidence(pred), then right ones by
    confidence(true). The wrong ones use the non-saturating log-odds of the prediction."""
    return (1, rec.confidence) if rec.correct else (0, -pred_log_odds)


def sift_low_confidence(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    *,
    per_class: int = 20,
    low: float = 0.6,
    high: float = 0.8,
    misclassified_first: bool = False,
    device: str | torch.device = "cpu",
) -> list[SiftRecord]:
    """Return up to ``per_class`` records per class, class 0 first, in selection order.

    ``loader`` must yield ``(images, targets)`` over the dataset in order (no shuffling): the
    running position is taken as the dataset index. The model is expected on ``device``; it is
    run in eval mode and its previous train/eval mode is restored afterwards.
    """
    _check(num_classes, per_class, low, high)
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise ConfigError("sift_low_confidence needs an unshuffled loader (index = position)")

    # per class: (sort key, record)
    chosen: list[list[tuple[tuple, SiftRecord]]] = [[] for _ in range(num_classes)]
    was_training = model.training
    model.eval()
    position = 0
    try:
        with torch.inference_mode():
            for images, targets in loader:
                logits = model(images.to(device))
                if logits.ndim != 2 or logits.shape[1] != num_classes:
                    raise ConfigError(
                        f"model outputs shape {tuple(logits.shape)}, expected (batch, {num_classes})"
                    )
                targets = torch.as_tensor(targets).to(logits.device).long()
                if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
                    raise DataError(f"targets outside [0, {num_classes}) near index {position}")
                probs = logits.double().softmax(dim=1)
                pred = logits.argmax(dim=1)
                pred_odds = true_class_log_odds(logits, pred)
                true_conf = probs.gather(1, targets[:, None])[:, 0]
                for t, p, tc, po in zip(
                    targets.tolist(), pred.tolist(), true_conf.tolist(), pred_odds.tolist()
                ):
                    rec = SiftRecord(position, t, p, tc, p == t)
                    position += 1
                    in_band = low <= tc < high
                    if misclassified_first and (not rec.correct or in_band):
                        chosen[t].append(((*_score(rec, po), rec.index), rec))
                    elif not misclassified_first and in_band:
                        chosen[t].append(((tc, rec.index), rec))
    finally:
        model.train(was_training)

    out: list[SiftRecord] = []
    for candidates in chosen:
        candidates.sort(key=lambda kr: kr[0])
        out.extend(rec for _, rec in candidates[:per_class])
    return out
