"""Class-aware data samplers for long-tailed training, created by name.

Re-sampling is the data-side alternative to re-weighting the loss (Kang et al. 2020, "Decoupling
representation and classifier"): a sampler decides how often each class is seen per epoch.
``create_sampler('none', ...)`` returns ``None`` so callers keep the loader's plain shuffling.

Every sampler draws from a generator seeded by ``(seed, epoch)``, never from global state: call
``set_epoch(epoch)`` before each epoch and a resumed run sees exactly the indices it would have
seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import ConfigError

__all__ = [
    "ClassBalancedSampler",
    "ClassProbSampler",
    "SqrtSampler",
    "ProgressiveSampler",
    "register_sampler",
    "list_samplers",
    "create_sampler",
    "check_batch_size",
]

_NONE_NAMES = ("", "none", "random")
_SAMPLERS: dict[str, Callable[..., Sampler]] = {}


def _as_targets(targets: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise ConfigError("a sampler needs a non-empty list of targets")
    if arr.min() < 0:
        raise ConfigError(f"targets must be class indices >= 0, got {int(arr.min())}")
    return arr


class _EpochSampler(Sampler[int]):
    """Shared state: the targets, the classes present, the epoch and its generator."""

    def __init__(self, targets, epoch_length: int | None = None, seed: int = 0):
        self.targets = _as_targets(targets)
        # only classes that occur can be sampled; an absent class has no items to draw
        self.classes, self.class_counts = np.unique(self.targets, return_counts=True)
        self.class_items = [np.flatnonzero(self.targets == c) for c in self.classes]
        if epoch_length is not None and int(epoch_length) < 1:
            raise ConfigError(f"epoch_length must be a positive integer, got {epoch_length!r}")
        self.epoch_length = (
            int(epoch_length) if epoch_length is not None else self._default_length()
        )
        self.seed = int(seed)
        self.epoch = 0

    def _default_length(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) draw ``__iter__`` yields."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def __len__(self) -> int:
        return self.epoch_length


class ClassBalancedSampler(_EpochSampler):
    """Class-aware sampling (Shen et al. 2016, as used by Kang et al. 2020).

    Visit classes in a random order that is reshuffled after each full pass; from each visited
    class take ``num_samples_cls`` consecutive items of that class's own list, which is also
    cycled and reshuffled when exhausted. Every class is thus seen equally often, and within a
    class every item is seen before any repeats. Default epoch length: max count x classes.
    """

    def __init__(self, targets, num_samples_cls: int = 4, epoch_length: int | None = None,
                 seed: int = 0):  # fmt: skip
        if int(num_samples_cls) < 1:
            raise ConfigError(
                f"num_samples_cls must be a positive integer, got {num_samples_cls!r}"
            )
        self.num_samples_cls = int(num_samples_cls)
        super().__init__(targets, epoch_length, seed)

    def _default_length(self) -> int:
        return int(self.class_counts.max()) * len(self.classes)

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        class_cycle = _RandomCycle(np.arange(len(self.classes)), rng)
        item_cycles = [_RandomCycle(items, rng) for items in self.class_items]
        out = np.empty(self.epoch_length, dtype=np.int64)
        for start in range(0, self.epoch_length, self.num_samples_cls):
            cycle = item_cycles[class_cycle.take(1)[0]]
            n = min(self.num_samples_cls, self.epoch_length - start)
            out[start : start + n] = cycle.take(n)
        return iter(out.tolist())


class _RandomCycle:
    """Endless pass over ``items`` in random order, reshuffled at every wrap-around."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items, self.rng = items, rng
        self.order = rng.permutation(items)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(self.items), 0
            k = min(n, len(self.order) - self.pos)
            out.append(self.order[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return np.concatenate(out)


class ClassProbSampler(_EpochSampler):
    """Draw a class with probability ``class_probs(epoch)``, then an item uniformly within it.

    Sampling is with replacement, so any class distribution can be reached in an epoch of any
    length. Default probabilities: instance-balanced (``n_c / N``, i.e. plain random sampling).
    """

    def class_probs(self, epoch: int | None = None) -> np.ndarray:
        """Probability of each class in ``self.classes`` at ``epoch`` (default: current)."""
        return self.class_counts / self.class_counts.sum()

    def item_probs(self, epoch: int | None = None) -> np.ndarray:
        """Probability of each dataset index per draw: class probability / class size."""
        per_class = self.class_probs(epoch) / self.class_counts
        probs = np.zeros(len(self.targets))
        for p, items in zip(per_class, self.class_items):
            probs[items] = p
        return probs / probs.sum()

    def __iter__(self) -> Iterator[int]:
        idx = self._rng().choice(len(self.targets), size=self.epoch_length, p=self.item_probs())
        return iter(idx.tolist())


class SqrtSampler(ClassProbSampler):
    """Square-root sampling (Mahajan et al. 2018; Kang et al. 2020): ``p_c ∝ n_c ** 0.5``.

    A middle ground between instance-balanced (q=1) and class-balanced (q=0) sampling.
    """

    q = 0.5

    def class_probs(self, epoch: int | None = None) -> np.ndarray:
        w = self.class_counts.astype(np.float64) ** self.q
        return w / w.sum()


class ProgressiveSampler(ClassProbSampler):
    """Progressively-balanced sampling (Kang et al. 2020).

    ``p_c(t) = (1 - a) * n_c / N + a / C`` with ``a = t / (T - 1)``: instance-balanced at the
    first epoch (learn features from all data), class-balanced at the last one (``T`` =
    ``total_epochs``; epochs past the end stay class-balanced). Kang et al. write ``t / T``; the
    ``T - 1`` makes the last epoch the one that is fully balanced.
    """

    def __init__(self, targets, total_epochs: int, epoch_length: int | None = None,
                 seed: int = 0):  # fmt: skip
        if total_epochs is None or int(total_epochs) < 1:
            raise ConfigError(
                f"the progressive sampler needs total_epochs (a positive integer), got {total_epochs!r}"
            )
        self.total_epochs = int(total_epochs)
        super().__init__(targets, epoch_length, seed)

    def class_probs(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else int(epoch)
        # a single-epoch run is its own last epoch: class-balanced
        a = 1.0 if self.total_epochs == 1 else min(max(epoch / (self.total_epochs - 1), 0.0), 1.0)
        instance = self.class_counts / self.class_counts.sum()
        balanced = np.full(len(self.classes), 1.0 / len(self.classes))
        return (1.0 - a) * instance + a * balanced


def register_sampler(name: str) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    """Register a factory ``fn(targets, *, num_samples_cls, epoch_length, total_epochs, seed)``."""

    def wrap(fn: Callable[..., Sampler]) -> Callable[..., Sampler]:
        _SAMPLERS[name] = fn
        return fn

    return wrap


@register_sampler("class_balanced")
def _class_balanced(targets, *, num_samples_cls=4, epoch_length=None, total_epochs=None, seed=0):
    return ClassBalancedSampler(targets, num_samples_cls, epoch_length, seed)


@register_sampler("sqrt")
def _sqrt(targets, *, num_samples_cls=4, epoch_length=None, total_epochs=None, seed=0):
    return SqrtSampler(targets, epoch_length, seed)


@register_sampler("progressive")
def _progressive(targets, *, num_samples_cls=4, epoch_length=None, total_epochs=None, seed=0):
    return ProgressiveSampler(targets, total_epochs, epoch_length, seed)


def list_samplers() -> list[str]:
    """Valid sampler names (``none`` means the loader's own shuffling)."""
    return ["none", *sorted(_SAMPLERS)]


def create_sampler(
    name: str | None,
    targets,
    *,
    num_samples_cls: int = 4,
    epoch_length: int | None = None,
    total_epochs: int | None = None,
    seed: int = 0,
) -> Sampler | None:
    """Build the sampler ``name`` over ``targets``; ``None`` for plain shuffling.

    A returned sampler replaces ``shuffle=True`` in the DataLoader; call its ``set_epoch``
    at the start of every epoch.
    """
    key = (name or "").strip().lower().replace("-", "_")
    if key in _NONE_NAMES:
        return None
    if key not in _SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid names: {', '.join(list_samplers())}")
    return _SAMPLERS[key](
        targets,
        num_samples_cls=num_samples_cls,
        epoch_length=epoch_length,
        total_epochs=total_epochs,
        seed=seed,
    )


def check_batch_size(sampler_len: int, batch_size: int) -> None:
    """Refuse a batch larger than an epoch: with drop_last the loader would yield no batch."""
    if batch_size > sampler_len:
        raise ConfigError(
            f"batch size {batch_size} is larger than the sampler's epoch length {sampler_len}"
        )
