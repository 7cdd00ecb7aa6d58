"""The GA: operators on hand-made populations, fitness on hand values, planted net, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from splitter_helpers import NUM_CLASSES, PlantedNet, batches, planted_data

from md_plugin.splitter import SearchConfig, create_gene_layout, jaccard_distances, modularize
from md_plugin.splitter.fitness import prune_threshold, pruning_evaluation
from md_plugin.splitter.search import crossover, init_population, mutate, next_population


# -- operators ---------------------------------------------------------------------------------
def test_crossover_is_single_point_of_neighbouring_parents():
    parents = np.repeat(np.arange(3)[:, None], 6, 1)  # parent k is all k
    kids = crossover(parents, 5, np.random.default_rng(1))
    cuts = [int(np.random.default_rng(1).integers(6))]
    rng = np.random.default_rng(1)
    cuts = [int(rng.integers(6)) for _ in range(5)]
    for k, (kid, cut) in enumerate(zip(kids, cuts)):
        assert kid.tolist() == [k % 3] * cut + [(k + 1) % 3] * (6 - cut)


def test_mutation_resets_a_fixed_number_of_distinct_genes():
    pop = np.zeros((50, 20), dtype=bool)
    out = mutate(pop, 0.25, np.random.default_rng(0))  # 5 genes reset per offspring
    changed = out.sum(1)
    assert changed.max() <= 5 and changed.min() >= 0
    assert 1.5 < changed.mean() < 3.5  # each reset lands on 1 with probability 1/2
    assert (mutate(pop, 0.0, np.random.default_rng(0)) == pop).all()
    assert not pop.any()  # the input is not modified


def test_next_population_keeps_the_best_in_order_and_breeds_the_top_half():
    pop = np.eye(10, dtype=bool)  # solution i has only bit i
    fitness = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.0])
    cfg = SearchConfig(population=10, keep_frac=0.2, parents_frac=0.5, mutation=0.0)
    new = next_population(pop, fitness, cfg, np.random.default_rng(0))
    assert new[0].argmax() == 1 and new[1].argmax() == 3  # the two best, unchanged, first
    # offspring bits come only from the 5 best parents (1, 3, 5, 7, 2)
    assert not new[2:, [0, 4, 6, 8, 9]].any()


def test_init_population_ratios_and_importance_bias():
    orders = [[torch.arange(c) for c in (20, 20, 4)]]
    layout = create_gene_layout([20, 20, 4], orders)
    assert layout.genes == [10, 10, 4]
    cfg = SearchConfig(population=400, ratios_sensitive=(0.5,), ratios=(0.25,),
                       sensitive_fraction=0.5)  # fmt: skip
    pop = init_population(layout, cfg, np.random.default_rng(0))
    assert (pop[:, :10].sum(1) == 5).all() and (pop[:, 10:20].sum(1) == 5).all()  # sensitive
    assert (pop[:, 20:].sum(1) == 1).all()  # floor(4 * 0.25)
    freq = pop[:, :10].mean(0)
    assert freq[0] > freq[9] + 0.1  # exp((G-1-i)/10): important blocks are drawn more often


def test_decode_keeps_blocks_in_importance_order_and_never_empties_a_group():
    order = torch.tensor([3, 0, 4, 1, 2])
    layout = create_gene_layout([5], [[order]])
    assert layout.genes == [5]
    (m,) = layout.decode(0, np.array([1, 0, 1, 0, 0], dtype=bool))
    assert m.nonzero().flatten().tolist() == [3, 4]
    (m,) = layout.decode(0, np.zeros(5, dtype=bool))
    assert m.nonzero().flatten().tolist() == [3]  # the most important channel survives
    wide = create_gene_layout([300], [[torch.arange(300)]])
    assert wide.genes == [100] and len(wide.blocks(0, 0)[0]) == 3


# -- fitness -----------------------------------------------------------------------------------
def _hand_case():
    y = np.array([0, 0, 1, 1])
    own = np.array([[[5, 5, 0, 0], [0, 0, 0, 0]], [[1, 1, 3, 3], [1, 1, -1, -1]]], dtype=np.float32)
    kernels = [
        np.array([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool),
        np.array([[0, 0, 1, 1], [1, 0, 1, 0]], dtype=bool),
    ]
    return own, kernels, np.ones(4), y


def test_jaccard_on_hand_values():
    _, k, w, _ = _hand_case()
    d = jaccard_distances(k[0], k[1], w)
    np.testing.assert_allclose(d, [[1.0, 2 / 3], [0.5, 0.5]])
    # weights count kernels: channel 0 standing for 3 kernels
    d = jaccard_distances(k[0][:1], k[1][1:], np.array([3.0, 1, 1, 1]))
    np.testing.assert_allclose(d, [[1 - 3 / 5]])


def test_pruning_evaluation_on_hand_values():
    own, kernels, w, y = _hand_case()
    # compositions (i, j): acc 1, .5, .5, 0; div 1, 2/3, .5, .5; F = acc + 0.1 div (w = 1)
    f_all = {(0, 0): 1.1, (0, 1): 0.5 + 0.1 * 2 / 3, (1, 0): 0.55, (1, 1): 0.05}
    fit, final = pruning_evaluation(own, kernels, w, y, np.random.default_rng(0), 1.0, 0.9, 4, 10)
    assert final.n == 4
    np.testing.assert_allclose(fit[0], [1.1, 0.55])
    np.testing.assert_allclose(fit[1], [1.1, f_all[(0, 1)]])
    # keep only 2 (one passes the 0.95 threshold, n_min 2): (0,0), then (0,1) wins the .5 tie
    fit, final = pruning_evaluation(own, kernels, w, y, np.random.default_rng(0), 1.0, 0.9, 2, 10)
    assert sorted(map(tuple, final.idx.tolist())) == [(0, 0), (0, 1)]
    np.testing.assert_allclose(fit, [[1.1, 0.0], [1.1, f_all[(0, 1)]]])
    # w scales accuracy only
    fit, _ = pruning_evaluation(own, kernels, w, y, np.random.default_rng(0), 2.0, 0.9, 4, 10)
    np.testing.assert_allclose(fit[0], [2.1, 1.05])


def test_elitism_reappends_the_previous_best():
    own, kernels, w, y = _hand_case()
    own = own[:, ::-1].copy()  # now (1, 1) is the perfect pair, (0, 0) the worst
    kernels = [k[::-1].copy() for k in kernels]
    fit, final = pruning_evaluation(own, kernels, w, y, np.random.default_rng(0), 1.0, 0.9, 1, 1)
    assert final.idx.tolist() == [[1, 1], [0, 0]]
    np.testing.assert_allclose(fit, [[0.05, 1.1], [0.05, 1.1]])


@pytest.mark.parametrize("n", [3, 4])
def test_pruning_without_pruning_equals_brute_force(n):
    """With n_min above every cross product, the hierarchy scores all P^N compositions."""
    rng = np.random.default_rng(n)
    p, v = 3, 24
    own = rng.normal(size=(n, p, v)).astype(np.float32)
    y = rng.integers(0, n, size=v)
    kernels = [rng.random((p, 10)) < 0.5 for _ in range(n)]
    w8 = np.ones(10)
    fit, final = pruning_evaluation(own, kernels, w8, y, rng, 1.3, 0.9, 10**6, 10**6)
    assert final.n == p**n
    best = np.zeros((n, p))
    for comb in itertools.product(range(p), repeat=n):
        logits = np.stack([own[c, comb[c]] for c in range(n)])
        acc = (logits.argmax(0) == y).mean()
        div = np.mean([jaccard_distances(kernels[a][comb[a]][None], kernels[b][comb[b]][None], w8)[0, 0]
                       for a, b in itertools.combinations(range(n), 2)])  # fmt: skip
        f = 1.3 * acc + 0.1 * div
        for c in range(n):
            best[c, comb[c]] = max(best[c, comb[c]], f)
    np.testing.assert_allclose(fit, best, atol=1e-9)


def test_prune_thresholds_follow_the_paper():
    assert [prune_threshold(k, 10) for k in (2, 4, 8, 10)] == [0.95, 0.95, 0.85, 0.8]
    assert [prune_threshold(k, 5) for k in (2, 4, 5)] == [0.95, 0.9, 0.85]


# -- end to end on the planted network ---------------------------------------------------------
def _split(tmp_path=None, generations=12, **kw):
    torch.manual_seed(0)
    x, y = planted_data(20)
    return modularize(
        PlantedNet(), batches(x, y), generations=generations, population=8, val_images=45,
        seed=kw.pop("seed", 0), state_path=str(tmp_path / "state.pt") if tmp_path else None,
        min_confidence=0.5, log=lambda s: None, **kw,
    )  # fmt: skip


def test_search_finds_the_planted_channels():
    mods = _split()
    assert mods.stats["strong_acc"] == 100.0
    assert mods.stats["composed_acc"] == 100.0
    for c in range(NUM_CLASSES):
        for g in mods.group_masks(c):  # conv1 and conv2 groups
            assert g[4 * c] or g[4 * c + 1], f"module {c} lost its signal channels"
    # importance alone would keep the noise first: the search really chose
    kept = [m["kernels_pct"] for m in mods.stats["modules"]]
    assert max(kept) < 100.0
    assert len(mods.options["history"]) == 12


def _timeless(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_resume_gives_the_same_modules(tmp_path):
    full = _split(tmp_path / "a", generations=8)
    (tmp_path / "b").mkdir()
    _split(tmp_path / "b", generations=3)  # "killed" after generation 3 (state saved each gen)
    resumed = _split(tmp_path / "b", generations=8)
    assert torch.equal(full.masks, resumed.masks)
    assert _timeless(full.options["history"]) == _timeless(resumed.options["history"])
    assert full.options["best_generation"] == resumed.options["best_generation"]


def test_resume_refuses_another_search(tmp_path):
    from md_plugin.errors import MDError

    _split(tmp_path, generations=1)
    with pytest.raises(MDError, match="another search"):
        _split(tmp_path, generations=2, seed=1)


# -- a seeded search, pinned ---------------------------------------------------------------------
class _IntegerEvaluator:
    """Own-class logits that are integer sums (exact in float32 on any machine): logit of
    class row i on image v = sum of a fixed integer weight over the kept channels."""

    def __init__(self, sg, n_val: int, classes: list[int], seed: int = 11):
        self.sg, self.classes = sg, classes
        n_channels = sum(g.channels for g in sg.groups)
        rng = np.random.default_rng(seed)
        self.w = rng.integers(-4, 5, size=(len(classes), n_val, n_channels)).astype(np.float32)

    def own_logits(self, i: int, masks) -> np.ndarray:
        return (self.w[i] * torch.cat(masks).numpy()).sum(1)


def _pinned_search(state_path=None, generations: int = 8, log=None):
    from md_plugin.splitter import create_split_graph
    from md_plugin.splitter.search import run_search

    sg = create_split_graph(PlantedNet(), (NUM_CLASSES, 8, 8))
    orders = [[torch.arange(c).flip(0) for c in sg.num_channels] for _ in range(NUM_CLASSES)]
    layout = create_gene_layout(sg.num_channels, orders)
    cfg = SearchConfig(generations=generations, population=6, val_images=24, seed=5, mutation=0.2)
    y = np.arange(24) % NUM_CLASSES
    evaluator = _IntegerEvaluator(sg, 24, list(range(NUM_CLASSES)))
    return run_search(layout, evaluator, y, cfg, state_path, log=log or (lambda s: None))


def test_a_seeded_search_gives_exactly_the_pinned_result(tmp_path):
    """The GA's whole output for a fixed seed (recorded before run_search was split into
    helpers): any change to the RNG draws, the bookkeeping of the best generation (a later
    tie does not replace it; generation 3 is worse than 2) or the scores shows here."""
    lines = []
    result = _pinned_search(log=lines.append)
    assert result.best_generation == 5
    assert ["".join(str(int(b)) for b in row) for row in result.genes] == [
        "01010101000111010100",
        "00100101101101001000",
        "11111001010100010000",
    ]
    h = result.history
    assert [g["generation"] for g in h] == list(range(8))
    assert [round(g["acc"] * 24) for g in h] == [15, 15, 16, 15, 16, 16, 16, 16]
    assert [g["acc"] * 24 for g in h] == [round(g["acc"] * 24) for g in h]  # whole images
    assert [g["val_fitness"] for g in h] == pytest.approx(
        [0.6185130718954248, 0.6185130718954248, 0.6509803921568627, 0.6227683178534571,
         0.6611519607843137, 0.6675925925925925, 0.6675925925925925, 0.6675925925925925],
        rel=1e-12,
    )  # fmt: skip
    assert [g["kernels"] for g in h] == pytest.approx(
        [0.5, 0.5, 0.5277777777777778, 0.5138888888888888, 0.47222222222222215,
         0.4583333333333333, 0.4583333333333333, 0.4583333333333333],
        rel=1e-12,
    )  # fmt: skip
    assert [g["mean_fitness"] for g in h] == pytest.approx(
        [0.410661693039789, 0.2513417496628281, 0.2270874183006536, 0.2258532405814828,
         0.26451396851788145, 0.28082713023481, 0.27081533718100625, 0.23902099338760843],
        rel=1e-12,
    )  # fmt: skip
    assert len(lines) == 8 and lines[5].startswith(
        "gen 6/8: composed acc 66.67% diversity 67.59% kernels kept 45.8% (best gen 6: 66.67%) "
    )
    # stopped after generation 3 and resumed from the saved state: the same search
    state = tmp_path / "state.pt"
    _pinned_search(state, generations=3)
    lines = []
    resumed = _pinned_search(state, log=lines.append)
    assert lines[0] == "resuming the search from generation 3" and len(lines) == 6
    assert np.array_equal(resumed.genes, result.genes)
    assert resumed.best_generation == 5 and _timeless(resumed.history) == _timeless(h)
    assert [torch.equal(a, b) for ma, mb in zip(resumed.masks, result.masks)
            for a, b in zip(ma, mb)] == [True] * (NUM_CLASSES * 2)  # fmt: skip
