"""Stratified, seeded hold-out splits carved from a training set.

CIFAR has no validation split: timm's "validation" is its test set, so anything chosen on it
(best epoch, alpha, a splitter's modules) is chosen on test data. ``stratified_split`` takes a
held-out set from the *training* images instead, in each class's proportion, so that choices are
made on images the model never fit and the test set is read once at the end. The same
``(targets, n, seed)`` always gives the same split, which lets another tool (the CNNSplitter)
rebuild exactly the images a model was trained without.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["stratified_split", "resolve_holdout_size", "parse_count_or_fraction"]


def parse_count_or_fraction(value: object) -> int | float:
    """``'500'`` -> 500 images, ``'0.2'`` -> a fraction; anything else is a one-line error."""
    if isinstance(value, bool):
        raise ConfigError(f"expected an image count >= 1 or a fraction in (0, 1), got {value!r}")
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"expected an image count >= 1 or a fraction in (0, 1), got {value!r}"
        ) from None
    if 0.0 < f < 1.0:
        return f
    if f >= 1.0 and f.is_integer():
        return int(f)
    raise ConfigError(f"expected an image count >= 1 or a fraction in (0, 1), got {value!r}")


def resolve_holdout_size(n: int | float, total: int) -> int:
    """Total held-out images for ``n`` (a count, or a fraction of ``total`` rounded)."""
    n = parse_count_or_fraction(n)
    return int(round(n * total)) if isinstance(n, float) else n


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class held-out counts: proportional to ``counts`` by largest remainder.

    Every class keeps at least one training image. When ``n`` allows it, every class with at
    least two images also gets at least one held-out image (so per-class validation accuracy is
    defined for rare classes); the extra image comes from the class with the largest share.
    """
    total = int(counts.sum())
    cap = np.maximum(counts - 1, 0)
    if n > int(cap.sum()):
        raise ConfigError(
            f"cannot hold out {n} of {total} training images: every class must keep at least one "
            f"(at most {int(cap.sum())})"
        )
    quota = n * counts / total
    held = np.minimum(np.floor(quota).astype(np.int64), cap)
    # largest remainder first; ties go to the lower class index (stable sort)
    order = np.argsort(-(quota - held), kind="stable")
    i = 0
    while held.sum() < n:
        c = order[i % len(order)]
        if held[c] < cap[c]:
            held[c] += 1
        i += 1
    eligible = np.flatnonzero(cap >= 1)
    if n >= len(eligible):
        for c in eligible:
            if held[c] == 0:
                donor = int(np.argmax(np.where(held > 1, held, -1)))
                if held[donor] <= 1:
                    break
                held[donor] -= 1
                held[c] += 1
    return held


def stratified_split(
    targets: Sequence[int] | np.ndarray, n: int | float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(targets)-1`` into ``(keep_idx, held_idx)``, both sorted.

    ``n`` is the number of held-out images (``int >= 1``) or a fraction of the set (``0 < n <
    1``). Each class contributes in proportion to its size (largest-remainder rounding), keeps at
    least one image, and its held-out images are drawn by one ``RandomState(seed)`` shuffling each
    class's positions in class order.
    """
    t = np.asarray(targets, dtype=np.int64)
    if t.ndim != 1 or len(t) == 0:
        raise ConfigError("cannot hold out images from an empty training set")
    if t.min() < 0:
        raise ConfigError("targets must be non-negative class indices")
    size = resolve_holdout_size(n, len(t))
    if size < 1:
        raise ConfigError(f"a hold-out of {n!r} of {len(t)} images is empty")
    counts = np.bincount(t)
    held_per_class = _allocate(counts, size)
    rng = np.random.RandomState(seed)
    held = []
    for c, h in enumerate(held_per_class):
        idx = np.flatnonzero(t == c)
        if len(idx) == 0:
            continue
        rng.shuffle(idx)
        held.append(idx[:h])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(t), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx
