"""Long-tailed CIFAR-10/100 (CIFAR-10-LT, CIFAR-100-LT) as LDAM-DRW builds them.

Published long-tail numbers (LDAM-DRW, decoupling, balanced softmax, logit adjustment ...) are
all measured on the subset of Cao et al. 2019 (kaidic/LDAM-DRW ``imbalance_cifar.py``): class
``i`` keeps ``int(n_max * (1 / imb_ratio) ** (i / (C - 1)))`` images, drawn by shuffling each
class's indices with numpy seeded once by ``imb_seed``. Results are only comparable on that exact
subset, so the counts, the rounding (``int`` truncation of ``n_max * imb_factor ** ...``) and
the random stream are reproduced here, not just the shape of the distribution.

Only the train split is subsampled; the test split stays balanced, which is what makes per-class
and many/medium/few-shot accuracy meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .cifar import CIFAR10, CIFAR100

__all__ = [
    "CIFAR10LT",
    "CIFAR100LT",
    "IMB_TYPES",
    "check_imb_ratio",
    "img_num_per_cls",
    "long_tail_indices",
]

IMB_TYPES = ("exp", "step")


def check_imb_ratio(imb_ratio: object) -> float:
    """Return ``imb_ratio`` as a float > 1 (numeric strings from a command line are accepted)."""
    try:
        value = float(imb_ratio)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(
            f"imb_ratio must be a number greater than 1 (n_max / n_min, e.g. 100), got {imb_ratio!r}"
        ) from None
    if isinstance(imb_ratio, bool) or not math.isfinite(value) or value <= 1.0:
        raise ConfigError(
            f"imb_ratio must be a finite number greater than 1 (n_max / n_min, e.g. 100), "
            f"got {imb_ratio!r}"
        )
    return value


def _check_args(imb_ratio: object, imb_type: str) -> tuple[float, str]:
    ratio = check_imb_ratio(imb_ratio)
    if imb_type not in IMB_TYPES:
        raise ConfigError(f"imb_type must be one of {', '.join(IMB_TYPES)}, got {imb_type!r}")
    return ratio, imb_type


def img_num_per_cls(
    n_max: int, num_classes: int, imb_ratio: float, imb_type: str = "exp"
) -> list[int]:
    """Images kept per class, in natural class order (LDAM-DRW's rule and rounding).

    ``exp``: ``int(n_max * f ** (i / (C - 1)))`` with ``f = 1 / imb_ratio``.
    ``step``: the first ``C // 2`` classes keep ``n_max``, the rest ``int(n_max * f)``.
    """
    imb_ratio, imb_type = _check_args(imb_ratio, imb_type)
    # LDAM multiplies by imb_factor = 1 / ratio (not divide by ratio): keep that float path so
    # int() truncates exactly as in the published subsets
    imb_factor = 1.0 / imb_ratio
    if imb_type == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    head = num_classes // 2
    return [int(n_max)] * head + [int(n_max * imb_factor)] * (num_classes - head)


def long_tail_indices(
    targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0
) -> np.ndarray:
    """Indices of the long-tailed subset, grouped by class in class order.

    One ``RandomState(seed)`` shuffles each class's index list in turn: the same stream as
    LDAM's global ``np.random.seed(seed)`` followed by ``np.random.shuffle`` per class.
    """
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.RandomState(seed)
    keep = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets == c)[0]
        if len(idx) < n_c:
            raise DataError(
                f"class {c} has {len(idx)} training images but the long-tail profile needs {n_c}: "
                "the train split must be balanced (as the real CIFAR is)"
            )
        rng.shuffle(idx)
        keep.append(idx[:n_c])
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


class _LongTail:
    """Mixin: subsample a balanced CIFAR train split into a long tail after loading it."""

    data: np.ndarray
    targets: list[int]
    classes: list[str]

    def __init__(self, root, train: bool = True, imb_ratio: float = 100.0, imb_type: str = "exp",
                 imb_seed: int = 0, transform=None, target_transform=None,
                 download: bool = False):  # fmt: skip
        ratio, imb_type = _check_args(imb_ratio, imb_type)  # before the slow load: fail fast
        super().__init__(root, train=train, transform=transform,
                         target_transform=target_transform, download=download)  # fmt: skip
        self._setup_long_tail(train, ratio, imb_type, imb_seed)

    def _setup_long_tail(self, train: bool, imb_ratio: float, imb_type: str, imb_seed: int) -> None:
        num_classes = len(self.classes)
        self.imb_ratio, self.imb_type, self.imb_seed = imb_ratio, imb_type, imb_seed
        if train:
            # LDAM: n_max = len(train) / C (the real train split is balanced)
            n_max = len(self.targets) // num_classes
            counts = img_num_per_cls(n_max, num_classes, imb_ratio, imb_type)
            keep = long_tail_indices(self.targets, counts, imb_seed)
            targets = np.asarray(self.targets, dtype=np.int64)
            self.data = self.data[keep]
            self.targets = targets[keep].tolist()
        else:
            keep = np.arange(len(self.targets))
        #: positions of the kept images in the full split (identity for the test split)
        self.source_indices: np.ndarray = keep
        self.cls_num_list: list[int] = np.bincount(
            np.asarray(self.targets, dtype=np.int64), minlength=num_classes
        ).tolist()

    def get_cls_num_list(self) -> list[int]:
        """Images per class in this split (the class prior that re-balancing losses need)."""
        return list(self.cls_num_list)


class CIFAR10LT(_LongTail, CIFAR10):
    """CIFAR-10-LT: the LDAM-DRW long-tailed train split; the test split is the balanced one."""


class CIFAR100LT(_LongTail, CIFAR100):
    """CIFAR-100-LT: the LDAM-DRW long-tailed train split; the test split is the balanced one."""
