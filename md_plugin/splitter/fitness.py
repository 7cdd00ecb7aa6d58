"""Co-evolutionary fitness with the hierarchical pruning evaluation (spec section 4).

A module's fitness depends on the other classes' modules: compositions of one solution per
class are scored F = w * acc + (1 - alpha) * div, where acc is the accuracy of the argmax over
the members' own-class logits (on val samples of the members' classes) and div the mean
pairwise Jaccard distance of their kernel sets. Instead of all P^N compositions, classes are
shuffled and paired; each pair's P x P cross product is pruned to the top n by accuracy, and
survivor lists are merged pairwise (cross product, prune) until all N classes are covered. A
solution's fitness is the best F among the final compositions that contain it (0 if none);
the all-index-0 composition (the previous generation's best) always competes (elitism).

Everything is arrays: own logits [N, P, V], kernel sets as bool rows, Jaccard distances by
matrix products, compositions carried as (best logit, best class) per val sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Compositions",
    "jaccard_distances",
    "prune_threshold",
    "pruning_evaluation",
    "score_ensemble",
]

_CHUNK = 1 << 24  # elements per [rows, n2, V] block


def prune_threshold(k: int, n: int) -> float:
    """Accuracy threshold for keeping k-class compositions of an n-class task (the paper's
    table for 5 and 10 classes; the same pattern otherwise)."""
    table = {10: {2: 0.95, 4: 0.95, 8: 0.85, 10: 0.8}, 5: {2: 0.95, 4: 0.9, 5: 0.85}}
    if n in table and k in table[n]:
        return table[n][k]
    if k <= 2:
        return 0.95
    if k <= 4:
        return 0.9
    return 0.85 if k < n else 0.8


def jaccard_distances(ka: np.ndarray, kb: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """1 - |A n B| / |A u B| for every row pair of bool kernel sets ka [Pa, T], kb [Pb, T];
    ``weight`` [T] counts how many kernels each entry stands for."""
    a = ka.astype(np.float64) * weight
    inter = a @ kb.astype(np.float64).T
    sa = a.sum(1)[:, None]
    sb = (kb.astype(np.float64) * weight).sum(1)[None, :]
    union = sa + sb - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(union > 0, 1.0 - inter / union, 0.0)
    return d


@dataclass
class Compositions:
    """k-class compositions: ``idx`` [n, k] solution index per member class ``classes``."""

    classes: list[int]
    idx: np.ndarray
    top: np.ndarray  # [n, V] largest own logit among members
    arg: np.ndarray  # [n, V] class (row) achieving it
    divsum: np.ndarray  # [n] sum of pairwise Jaccard distances
    acc: np.ndarray  # [n]

    @property
    def n(self) -> int:
        return len(self.idx)


def _singletons(c: int, own: np.ndarray) -> Compositions:
    p = own.shape[1]
    return Compositions(
        [c], np.arange(p)[:, None], own[c], np.full(own[c].shape, c), np.zeros(p), np.ones(p)
    )


def _merge_scores(
    a: Compositions, b: Compositions, y: np.ndarray, dist: dict[tuple[int, int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """acc [na, nb] and divsum [na, nb] of every cross composition."""
    sel = np.isin(y, a.classes + b.classes)
    ys = y[sel]
    ta, aa, tb, ab = a.top[:, sel], a.arg[:, sel], b.top[:, sel], b.arg[:, sel]
    acc = np.empty((a.n, b.n))
    rows = max(1, _CHUNK // max(1, b.n * len(ys)))
    for s in range(0, a.n, rows):
        e = min(a.n, s + rows)
        pick_a = ta[s:e, None] >= tb[None]
        pred = np.where(pick_a, aa[s:e, None], ab[None])
        acc[s:e] = (pred == ys).mean(2) if len(ys) else 1.0
    div = a.divsum[:, None] + b.divsum[None, :]
    for i, ca in enumerate(a.classes):
        for j, cb in enumerate(b.classes):
            div = div + dist[(ca, cb)][a.idx[:, i][:, None], b.idx[:, j][None, :]]
    return acc, div


def _combine(a: Compositions, b: Compositions, ia: np.ndarray, ib: np.ndarray, acc, div):
    pick_a = a.top[ia] >= b.top[ib]
    return Compositions(
        a.classes + b.classes,
        np.concatenate([a.idx[ia], b.idx[ib]], 1),
        np.where(pick_a, a.top[ia], b.top[ib]),
        np.where(pick_a, a.arg[ia], b.arg[ib]),
        div,
        acc,
    )


def _f(acc: np.ndarray, divsum: np.ndarray, k: int, w: float, alpha: float) -> np.ndarray:
    pairs = k * (k - 1) / 2
    return w * acc + (1.0 - alpha) * (divsum / pairs if pairs else 0.0)


def _merge(
    a: Compositions,
    b: Compositions,
    y: np.ndarray,
    dist: dict[tuple[int, int], np.ndarray],
    num_classes: int,
    n_min: int,
    n_max: int,
    w: float,
    alpha: float,
) -> Compositions:
    acc, div = _merge_scores(a, b, y, dist)
    k = len(a.classes) + len(b.classes)
    flat = acc.ravel()
    n_ok = int((flat >= prune_threshold(k, num_classes)).sum())
    n = min(flat.size, max(n_min, min(n_max, n_ok)))
    # top n by accuracy (stable: lower flat index wins ties), then sorted by F
    order = np.argsort(-flat, kind="stable")[:n]
    ia, ib = np.unravel_index(order, acc.shape)
    f = _f(flat[order], div.ravel()[order], k, w, alpha)
    by_f = np.argsort(-f, kind="stable")
    ia, ib, order = ia[by_f], ib[by_f], order[by_f]
    return _combine(a, b, ia, ib, flat[order], div.ravel()[order])


def score_ensemble(
    own: np.ndarray, kernels: list[np.ndarray], weight: np.ndarray, y: np.ndarray, idx: np.ndarray
) -> tuple[float, float]:
    """(accuracy, mean pairwise Jaccard distance) of the composition ``idx`` [N]."""
    n = own.shape[0]
    logits = np.stack([own[c, idx[c]] for c in range(n)])  # [N, V]
    acc = float((logits.argmax(0) == y).mean())
    if n < 2:
        return acc, 0.0
    total = 0.0
    for a in range(n):
        for b in range(a + 1, n):
            total += float(
                jaccard_distances(kernels[a][idx[a]][None], kernels[b][idx[b]][None], weight)[0, 0]
            )
    return acc, total / (n * (n - 1) / 2)


def pruning_evaluation(
    own: np.ndarray,
    kernels: list[np.ndarray],
    weight: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    w: float,
    alpha: float = 0.9,
    n_min: int = 50,
    n_max: int = 500,
) -> tuple[np.ndarray, Compositions]:
    """Fitness [N, P] of every solution, and the final N-class compositions.

    ``own`` [N, P, V]: own-class logit of solution p of class c on val sample v; ``y`` [V] the
    samples' class rows (0..N-1); ``kernels[c]`` [P, T] bool kernel sets.
    """
    n, p, _ = own.shape
    dist = {}
    for a in range(n):
        for b in range(n):
            if a != b:
                dist[(a, b)] = jaccard_distances(kernels[a], kernels[b], weight)
    order = rng.permutation(n).tolist()
    lists = [_singletons(c, own) for c in order]
    while len(lists) > 1:
        nxt = []
        for i in range(0, len(lists) - 1, 2):
            nxt.append(_merge(lists[i], lists[i + 1], y, dist, n, n_min, n_max, w, alpha))
        if len(lists) % 2:
            nxt.append(lists[-1])  # an odd list passes through
        lists = nxt
    final = lists[0]
    cols = [final.classes.index(c) for c in range(n)]
    final.idx = final.idx[:, cols]
    final.classes = list(range(n))
    f = _f(final.acc, final.divsum, n, w, alpha) if n > 1 else final.acc * w
    if n > 1 and not (final.idx == 0).all(1).any():  # elitism: the previous best competes
        acc0, div0 = score_ensemble(own, kernels, weight, y, np.zeros(n, dtype=int))
        final.idx = np.concatenate([final.idx, np.zeros((1, n), dtype=final.idx.dtype)])
        final.acc = np.append(final.acc, acc0)
        final.divsum = np.append(final.divsum, div0 * n * (n - 1) / 2)
        f = np.append(f, w * acc0 + (1.0 - alpha) * div0)
    fitness = np.zeros((n, p))
    for c in range(n):
        np.maximum.at(fitness[c], final.idx[:, c], f)
    return fitness, final
