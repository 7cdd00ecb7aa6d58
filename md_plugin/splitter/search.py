"""The CNNSplitter genetic search (spec section 4), one population per class, co-evolved.

Per generation: evaluate every new solution once (one forward of its module over the cached
val subset, keeping its own-class logit), score all classes together with the pruning
evaluation (:mod:`.fitness`), record the generation's best ensemble (per-class argmax of
fitness, re-scored 0.9 * acc + 0.1 * div), then breed: steady-state selection (top half
parents, top fifth kept unchanged at the front), single-point crossover of neighbouring
parents, and {0,1} resets of a fixed number of genes per offspring. The whole state is saved
atomically after each generation, so a killed search resumes to the same result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_save
from ..errors import ConfigError, MDError
from .encoding import GeneLayout
from .extract import extract_module
from .fitness import pruning_evaluation, score_ensemble
from .groups import SplitGraph
from .masking import create_masked_model

__all__ = [
    "SearchConfig",
    "SearchResult",
    "ModuleEvaluator",
    "crossover",
    "mutate",
    "init_population",
    "next_population",
    "run_search",
]

_logger = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass
class SearchConfig:
    """Budget and GA settings. Paper scale: population 100, 200 generations, 50 parents, 20
    kept, full val split; the defaults are a CPU budget (see docs/splitter.md)."""

    generations: int = 10
    population: int = 20
    val_images: int = 250
    seed: int = 0
    mutation: float = 0.05
    parents_frac: float = 0.5
    keep_frac: float = 0.2
    alpha: float = 0.9
    gamma: float = 0.9
    ratios_sensitive: tuple[float, ...] = (0.5, 0.6, 0.7)
    ratios: tuple[float, ...] = (0.2, 0.3, 0.4)
    sensitive_fraction: float = 0.5
    # per-group ratio lists (``--init-ratios auto``: from the layer sensitivity); when set they
    # replace ratios / ratios_sensitive / sensitive_fraction
    group_ratios: tuple[tuple[float, ...], ...] | None = None
    eval_mode: str = "extracted"
    batch_size: int = 250

    def validate(self) -> None:
        checks = [
            (self.generations >= 1, f"--generations must be >= 1, got {self.generations}"),
            (self.population >= 4, f"--population must be >= 4, got {self.population}"),
            (self.val_images >= 2, f"--val-images must be >= 2, got {self.val_images}"),
            (0.0 <= self.mutation <= 1.0, f"--mutation must be in [0, 1], got {self.mutation}"),
            (0.0 < self.parents_frac <= 1.0, "--parents-frac must be in (0, 1]"),
            (0.0 <= self.keep_frac < 1.0, "--keep-frac must be in [0, 1)"),
            (0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}"),
            (0.0 <= self.sensitive_fraction <= 1.0, "--sensitive-fraction must be in [0, 1]"),
            (self.eval_mode in ("extracted", "masked"), "--eval-mode must be extracted|masked"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (
                all(0 < r <= 1 for r in (*self.ratios, *self.ratios_sensitive))
                and self.ratios
                and self.ratios_sensitive,
                "init ratios must be non-empty and in (0, 1]",
            ),
            (
                self.group_ratios is None
                or all(rs and all(0 < r <= 1 for r in rs) for rs in self.group_ratios),
                "per-group init ratios must be non-empty and in (0, 1]",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def n_parents(self) -> int:
        return max(2, round(self.parents_frac * self.population))

    @property
    def n_keep(self) -> int:
        return min(self.population - 1, round(self.keep_frac * self.population))

    @property
    def prune_bounds(self) -> tuple[int, int]:
        """The paper keeps 50..500 compositions at population 100; scaled with population."""
        lo = max(2, round(50 * self.population / 100))
        return lo, max(lo, round(500 * self.population / 100))


# -- GA operators ------------------------------------------------------------------------------
def init_population(layout: GeneLayout, cfg: SearchConfig, rng: np.random.Generator) -> np.ndarray:
    """[P, genes] bool. Per group: r from its ratio list (``cfg.group_ratios[g]``, else the
    larger list for the early "sensitive" groups), floor(G * r) bits drawn without replacement
    with p_i ~ exp((G-1-i)/10)."""
    off = layout.offsets
    n_groups = len(layout.genes)
    n_sens = math.ceil(cfg.sensitive_fraction * n_groups)
    if cfg.group_ratios is not None and len(cfg.group_ratios) != n_groups:
        raise ConfigError(f"{len(cfg.group_ratios)} per-group ratio lists for {n_groups} groups")
    pop = np.zeros((cfg.population, layout.num_genes), dtype=bool)
    for p in range(cfg.population):
        for g, G in enumerate(layout.genes):
            if cfg.group_ratios is not None:
                ratios = cfg.group_ratios[g]
            else:
                ratios = cfg.ratios_sensitive if g < n_sens else cfg.ratios
            r = ratios[rng.integers(len(ratios))]
            n = int(math.floor(G * r))
            if n == 0:
                continue
            prob = np.exp((G - 1 - np.arange(G)) / 10.0)
            on = rng.choice(G, size=n, replace=False, p=prob / prob.sum())
            pop[p, off[g] + on] = True
    return pop


def crossover(parents: np.ndarray, n_offspring: int, rng: np.random.Generator) -> np.ndarray:
    """Single-point crossover of parents k mod n and (k+1) mod n at a uniform cut in
    [0, genes): child = first[:cut] + second[cut:] (PyGAD's single_point_crossover)."""
    n, genes = parents.shape
    out = np.empty((n_offspring, genes), dtype=parents.dtype)
    for k in range(n_offspring):
        cut = int(rng.integers(genes))
        out[k, :cut] = parents[k % n, :cut]
        out[k, cut:] = parents[(k + 1) % n, cut:]
    return out


def mutate(offspring: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Reset floor(rate * genes) (at least one) distinct genes per offspring to a random bit."""
    out = offspring.copy()
    genes = out.shape[1]
    k = max(1, int(math.floor(rate * genes))) if rate > 0 else 0
    for row in out:
        idx = rng.choice(genes, size=k, replace=False)
        row[idx] = rng.integers(0, 2, size=k).astype(bool)
    return out


def next_population(
    pop: np.ndarray, fitness: np.ndarray, cfg: SearchConfig, rng: np.random.Generator
) -> np.ndarray:
    """Steady-state step: sort by fitness (stable), keep the top ``n_keep`` at the front, fill
    the rest with mutated crossovers of the top ``n_parents``."""
    order = np.argsort(-fitness, kind="stable")
    ranked = pop[order]
    parents = ranked[: cfg.n_parents]
    kids = crossover(parents, len(pop) - cfg.n_keep, rng)
    kids = mutate(kids, cfg.mutation, rng)
    return np.concatenate([ranked[: cfg.n_keep], kids])


# -- module evaluation -------------------------------------------------------------------------
class ModuleEvaluator:
    """Own-class logits of modules on a cached val subset: one forward per module."""

    def __init__(
        self,
        sg: SplitGraph,
        x: torch.Tensor,
        classes: Sequence[int],
        mode: str = "extracted",
        batch_size: int = 250,
        device: torch.device | str = "cpu",
    ):
        self.sg, self.x, self.classes = sg, x, list(classes)
        self.mode, self.batch_size, self.device = mode, batch_size, device
        self._masked = create_masked_model(sg).to(device) if mode == "masked" else None

    @torch.no_grad()
    def own_logits(self, i: int, masks: Sequence[torch.Tensor]) -> np.ndarray:
        if self._masked is not None:
            self._masked.set_masks(masks)
            net = self._masked
        else:
            net = extract_module(self.sg, masks).to(self.device)
        c = self.classes[i]
        outs = [
            net(self.x[s : s + self.batch_size].to(self.device))[:, c].float().cpu()
            for s in range(0, len(self.x), self.batch_size)
        ]
        return torch.cat(outs).numpy()


# -- the search loop ---------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Best ensemble (genes [N, genes] and masks) and the per-generation history."""

    genes: np.ndarray
    masks: list[list[torch.Tensor]]
    best_generation: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _state_signature(layout: GeneLayout, cfg: SearchConfig, classes: Sequence[int]) -> dict:
    sig = asdict(cfg)
    sig.pop("generations")  # extending a finished search is allowed
    sig.pop("batch_size")
    sig["ratios"] = list(cfg.ratios)
    sig["ratios_sensitive"] = list(cfg.ratios_sensitive)
    if cfg.group_ratios is not None:
        sig["group_ratios"] = [list(r) for r in cfg.group_ratios]
    sig["genes"] = list(layout.genes)
    sig["classes"] = list(classes)
    return sig


def _load_state(state_path: Path, sig: dict, log: Callable[[str], None]) -> dict[str, Any]:
    """The saved state of this very search (same signature), or one line saying why not."""
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MDError(f"cannot read search state {state_path}: {e}") from None
    if not isinstance(state, dict) or state.get("signature") != sig:
        raise MDError(
            f"search state {state_path} belongs to another search (different classes, "
            "model groups or GA settings); use a new output folder"
        )
    log(f"resuming the search from generation {state['generation']}")
    return state


def _new_state(layout: GeneLayout, cfg: SearchConfig, sig: dict, n: int) -> dict[str, Any]:
    """Generation 0: every class starts from the same seeded initial bits."""
    rng = np.random.default_rng(cfg.seed)
    init = init_population(layout, cfg, rng)
    return dict(
        version=STATE_VERSION,
        signature=sig,
        generation=0,
        pops=np.stack([init.copy() for _ in range(n)]),
        rng=rng.bit_generator.state,
        acc_prev=0.0,
        best=None,
        history=[],
    )


class _SolutionScores:
    """Own-class logits and kernel sets per (class, genes), evaluated once per solution.

    The GA keeps the top solutions unchanged, so most of a generation was already evaluated;
    entries of solutions that left the population are dropped each generation.
    """

    def __init__(self, layout: GeneLayout, evaluator: ModuleEvaluator):
        self.layout, self.evaluator = layout, evaluator
        # kernels each kernel-set entry stands for (its group's kernels per channel)
        self.weight = np.concatenate(
            [np.full(g.channels, float(g.kernels)) for g in evaluator.sg.groups]
        )
        self._cache: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, pops: np.ndarray, n_val: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """``pops`` [N, P, genes] -> own logits [N, P, V] and N kernel sets [P, T]."""
        n, population = pops.shape[:2]
        own = np.empty((n, population, n_val), dtype=np.float32)
        kernels, kept = [], {}
        for c in range(n):
            ks = np.empty((population, len(self.weight)), dtype=bool)
            for p in range(population):
                key = (c, pops[c, p].tobytes())
                if key not in self._cache:
                    masks = self.layout.decode(c, pops[c, p])
                    self._cache[key] = (
                        self.evaluator.own_logits(c, masks),
                        torch.cat(masks).numpy(),
                    )
                kept[key] = self._cache[key]
                own[c, p], ks[p] = self._cache[key]
            kernels.append(ks)
        self._cache = kept
        return own, kernels


def _generation_record(
    gen: int,
    own: np.ndarray,
    kernels: list[np.ndarray],
    weight: np.ndarray,
    y: np.ndarray,
    fitness: np.ndarray,
    cfg: SearchConfig,
) -> dict[str, Any]:
    """The generation's best ensemble (per-class argmax of fitness) scored on the val subset:
    accuracy, diversity, alpha * acc + (1 - alpha) * div, the mean share of kernels kept."""
    best_idx = fitness.argmax(1)
    acc, div = score_ensemble(own, kernels, weight, y, best_idx)
    val_fit = cfg.alpha * acc + (1 - cfg.alpha) * div
    kept = float(
        np.mean([(kernels[c][i] * weight).sum() / weight.sum() for c, i in enumerate(best_idx)])
    )
    return dict(generation=gen, acc=acc, div=div, val_fitness=val_fit, kernels=kept,
                mean_fitness=float(fitness.mean()))  # fmt: skip


def _keep_best(
    state: dict[str, Any], rec: dict[str, Any], pops: np.ndarray, best_idx: np.ndarray
) -> None:
    """Remember the generation's ensemble if it beats every earlier one on the val fitness."""
    best = state["best"]
    if best is None or rec["val_fitness"] > best["val_fitness"]:
        genes = np.stack([pops[c, i] for c, i in enumerate(best_idx)])
        state["best"] = dict(generation=rec["generation"], val_fitness=rec["val_fitness"],
                             acc=rec["acc"], div=rec["div"], genes=genes)  # fmt: skip


def _generation_line(rec: dict[str, Any], best: dict[str, Any], generations: int) -> str:
    return (
        f"gen {rec['generation'] + 1}/{generations}: composed acc {100 * rec['acc']:.2f}% "
        f"diversity {100 * rec['div']:.2f}% kernels kept {100 * rec['kernels']:.1f}% (best gen "
        f"{best['generation'] + 1}: {100 * best['acc']:.2f}%) {rec['seconds']:.1f} s"
    )


def _step(
    state: dict[str, Any],
    scores: _SolutionScores,
    y: np.ndarray,
    cfg: SearchConfig,
    rng: np.random.Generator,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One generation: evaluate, score the classes together, record, breed. Updates ``state``
    (population, generation, RNG state, best, history) and returns the generation's record."""
    t0 = time.perf_counter()
    gen, pops = state["generation"], state["pops"]
    own, kernels = scores(pops, len(y))
    w = cfg.alpha + max(0.0, cfg.gamma - state["acc_prev"])
    lo, hi = cfg.prune_bounds
    fitness, _ = pruning_evaluation(own, kernels, scores.weight, y, rng, w, cfg.alpha, lo, hi)
    rec = _generation_record(gen, own, kernels, scores.weight, y, fitness, cfg)
    state["history"].append(rec)
    _keep_best(state, rec, pops, fitness.argmax(1))
    state["acc_prev"] = rec["acc"]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    log(_generation_line(rec, state["best"], cfg.generations))
    state["pops"] = np.stack([next_population(p, f, cfg, rng) for p, f in zip(pops, fitness)])
    state["generation"] = gen + 1
    state["rng"] = rng.bit_generator.state
    return rec


def run_search(
    layout: GeneLayout,
    evaluator: ModuleEvaluator,
    y: np.ndarray,
    cfg: SearchConfig,
    state_path: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Run (or resume from ``state_path``) the co-evolutionary GA.

    ``y`` [V]: class row (0..N-1) of each cached val image. Returns the best generation's
    ensemble, chosen by 0.9 * acc + 0.1 * div on the val subset (as the original does).
    """
    cfg.validate()
    log = log or _logger.info
    n = len(evaluator.classes)
    sig = _state_signature(layout, cfg, evaluator.classes)
    state_path = Path(state_path) if state_path else None
    if state_path is not None and state_path.exists():
        state = _load_state(state_path, sig, log)
    else:
        state = _new_state(layout, cfg, sig, n)
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    scores = _SolutionScores(layout, evaluator)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.generations, initial=state["generation"], desc="split search",
                   dynamic_ncols=True)  # fmt: skip
    try:
        while state["generation"] < cfg.generations:
            rec = _step(state, scores, y, cfg, rng, log)
            if state_path is not None:
                atomic_save(state, state_path)  # a killed search resumes from here
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{100 * rec['acc']:.1f}", div=f"{100 * rec['div']:.1f}",
                                kept=f"{100 * rec['kernels']:.0f}%")  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    best = state["best"]
    if best is None:
        raise MDError("the search ran no generation")
    masks = [layout.decode(c, best["genes"][c]) for c in range(n)]
    return SearchResult(best["genes"], masks, best["generation"], state["history"])
