"""Turn per-class channel scores into relevant-channel masks.

Rules:
- ``theta`` (official Model Doctor): per-class min-max normalisation, relevant if > theta.
- ``mean`` (lab fork): relevant if the score is >= the class's mean score.
- ``topk``: the k highest-scoring channels of each class.

A class whose scores carry no information (no image used, or all scores equal) gets an
all-relevant mask, so the channel loss never penalises it; a silent all-irrelevant row would
penalise every channel.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["MASK_RULES", "check_mask_options", "compute_masks"]

MASK_RULES = ("theta", "mean", "topk")


def check_mask_options(
    rule: str, theta: float = 0.2, topk: int | None = None, channels: int | None = None
) -> None:
    """Refuse a bad rule/theta/topk up front (before a diagnosis pass, not after it).

    ``channels`` is the narrowest target layer's width, when known: topk cannot exceed it.
    """
    if rule not in MASK_RULES:
        raise ConfigError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")
    if rule == "theta" and not 0.0 <= theta <= 1.0:  # NaN fails too
        raise ConfigError(f"theta must be in [0, 1], got {theta}")
    if rule == "topk":
        hi = channels if channels is not None else "C"
        if topk is None or topk < 1 or (channels is not None and topk > channels):
            raise ConfigError(f"topk must be in [1, {hi}] for mask rule topk, got {topk}")


def compute_masks(
    scores: torch.Tensor,
    counts: torch.Tensor | None = None,
    rule: str = "theta",
    theta: float = 0.2,
    topk: int | None = None,
) -> torch.Tensor:
    """[K, C] scores -> [K, C] bool masks (True = relevant channel)."""
    scores = scores.float()
    check_mask_options(rule, theta, topk, int(scores.shape[1]))
    if rule == "theta":
        lo = scores.min(1, keepdim=True).values
        hi = scores.max(1, keepdim=True).values
        span = hi - lo
        norm = (scores - lo) / span.clamp_min(torch.finfo(torch.float32).tiny)
        masks = norm > theta
    elif rule == "mean":
        masks = scores >= scores.mean(1, keepdim=True)
    elif rule == "topk":
        assert topk is not None
        idx = scores.topk(topk, dim=1).indices
        masks = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    flat = scores.max(1).values == scores.min(1).values
    if counts is not None:
        flat = flat | (counts.to(flat.device) == 0)
    masks[flat] = True
    return masks
