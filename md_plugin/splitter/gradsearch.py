"""GradSplitter's gradient mask search (Qi et al., TOSEM 2023), on coupled channel groups.

Every module owns one learnable value per channel entry of every group (``[M, K]``, K = the
group channels in group order, as :attr:`SplitModules.masks`), initialised to ones. The forward
binarises it, ``mask = value > 0``, and the backward passes the gradient straight through,
clipped to [-1, 1] (GradSplitter's sign function, whose backward is ``hardtanh`` of the incoming
gradient). Every module also owns a head (:mod:`.head`) that scores its N logits; the modules
are composed by the argmax over the M scores. The loss is the cross-entropy of those scores
against the class plus ``alpha`` times the mean fraction of kernels kept (GradSplitter: 0.1),
or with ``target_kernels`` only the part of each module's fraction above the target.

Training alternates, as GradSplitter's schedule does: head-only epochs first (Adam, lr
``head_lr``), then cycles of 5 mask epochs (masks at ``mask_lr``, heads at ``head_lr / 10``) and
2 head epochs (heads at ``head_lr / 10``); each phase starts a fresh Adam. The strong weights
are frozen and BatchNorm stays in eval mode, so a head epoch (masks fixed) needs one forward
per image, computed once. All M modules run in one batched forward (:class:`.bank.ModuleBank`).
After each epoch the composed accuracy on the validation images is measured and a snapshot
(binary masks, heads) kept; the chosen epoch is the one with the fewest kernels among those
within ``select_tolerance`` points of the strong model's accuracy on the same images (the
authors' selection, ``select_modules.py``), else the most accurate one. The state is saved
atomically after every epoch, so a killed search resumes to the same bits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..data.targets import get_targets
from ..errors import ConfigError, MDError
from ..files import atomic_write
from .gradinit import MASK_INITS, importance_init
from .head import ModuleHeads, create_module_heads

__all__ = [
    "GradConfig",
    "GradResult",
    "TrainPool",
    "binary_masks",
    "create_phase_optimizer",
    "gradient_modules",
    "run_gradient_search",
    "schedule",
]

_logger = logging.getLogger(__name__)
STATE_VERSION = 1
CYCLE = ("mask",) * 5 + ("head",) * 2  # GradSplitter's iterative strategy after the head epochs


@dataclass
class GradConfig:
    """Budget and settings. GradSplitter: 5 head epochs + 140 (20 cycles) over 80% of the
    training set, batch 64, mask lr 1e-3, head lr 1e-2, alpha 0.1; the defaults are a CPU
    budget (docs/splitter.md)."""

    epochs: int = 23
    head_epochs: int = 2
    images_per_epoch: int = 1024
    batch_size: int = 64
    mask_lr: float = 0.02
    head_lr: float = 0.01
    alpha: float | None = None  # None: GradSplitter's 0.1, or 1.0 with a kernel target
    target_kernels: float | None = None
    target_mode: str = "above"
    mask_init: str = "ones"
    val_images: int = 500
    select_tolerance: float = 1.0
    seed: int = 0
    eval_batch_size: int = 250

    @property
    def kernel_alpha(self) -> float:
        """The kernel term's weight: as given, else 0.1 (GradSplitter's) or, with a target,
        1.0 (the term is zero below the target, so the weight only sets how fast the modules
        get there; 0.1 left resnet20 at 93.5% of its kernels after 23 epochs)."""
        if self.alpha is not None:
            return self.alpha
        return 0.1 if self.target_kernels is None else 1.0

    def validate(self) -> None:
        t = self.target_kernels
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.head_epochs >= 0, f"--head-epochs must be >= 0, got {self.head_epochs}"),
            (self.images_per_epoch >= 1, "--images-per-epoch must be >= 1"),
            (self.batch_size >= 1, "the gradient search's batch size must be >= 1"),
            (self.mask_lr > 0 and self.head_lr > 0, "--mask-lr and --head-lr must be > 0"),
            (
                self.alpha is None or self.alpha >= 0,
                f"--kernel-alpha must be >= 0, got {self.alpha}",
            ),
            (t is None or 0 < t <= 1, f"--target-kernels must be in (0, 1], got {t}"),
            (self.mask_init in MASK_INITS, f"--mask-init must be one of {'|'.join(MASK_INITS)}"),
            (self.val_images >= 2, f"--val-images must be >= 2, got {self.val_images}"),
            (self.select_tolerance >= 0, "--select-tolerance must be >= 0"),
            (self.eval_batch_size >= 1, "--batch-size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


def schedule(cfg: GradConfig) -> list[str]:
    """Phase of every epoch: ``head_epochs`` x 'head', then 5 x 'mask' + 2 x 'head' repeated."""
    out = ["head"] * cfg.head_epochs
    while len(out) < cfg.epochs:
        out.extend(CYCLE)
    return out[: cfg.epochs]


def _block_starts(phases: Sequence[str]) -> list[int]:
    """Epoch at which each epoch's phase block began (a new Adam per block)."""
    starts, s = [], 0
    for e, p in enumerate(phases):
        if e and p != phases[e - 1]:
            s = e
        starts.append(s)
    return starts


# -- masks ---------------------------------------------------------------------------------------
def binary_masks(values: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """``values > 0`` [M, K] bool; a group left empty keeps its largest value's channel, so a
    module is never cut in two (GradSplitter keeps kernel 0 of an empty layer)."""
    hard = values > 0
    for s, c in zip(np.cumsum([0, *channels[:-1]]).tolist(), channels):
        seg = hard[:, s : s + c]
        empty = ~seg.any(1)
        if empty.any():
            rows = empty.nonzero().flatten()
            seg[rows, values[rows, s : s + c].argmax(1)] = True
    return hard


class _Sign(torch.autograd.Function):
    """Forward: :func:`binary_masks` as 0/1 floats. Backward: the incoming gradient clipped to
    [-1, 1] (GradSplitter's ``MySign``: ``hardtanh(grad_output)``), whatever the value."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, channels: tuple[int, ...]) -> torch.Tensor:
        return binary_masks(values, channels).to(values.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


def kept_fraction(hard: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M] fraction of the strong model's kernels each module keeps (``weight`` [K]: kernels
    one entry stands for)."""
    return hard @ weight / weight.sum()


# -- training images -----------------------------------------------------------------------------
class TrainPool:
    """The training images of the split classes, a seeded draw of them per epoch.

    ``dataset`` yields ``(image, label)`` with labels in the model's output space (transforms
    applied); ``targets`` its labels. :meth:`from_loader` reads a loader's map-style dataset
    lazily (labels without decoding images where the dataset allows) or, for any other
    iterable, holds its images in memory.
    """

    def __init__(
        self,
        dataset: Dataset,
        targets: Sequence[int],
        classes: Sequence[int],
        workers: int = 0,
    ):
        t = np.asarray(targets, dtype=np.int64)
        self.row = {int(c): i for i, c in enumerate(classes)}
        self.indices = np.flatnonzero(np.isin(t, list(self.row)))
        missing = sorted(set(self.row) - set(t[self.indices].tolist()))
        if missing:
            raise MDError(f"the training data has no image of class(es) {missing}")
        self.dataset, self.workers = dataset, workers

    @classmethod
    def from_loader(cls, loader: Iterable, classes: Sequence[int]) -> TrainPool:
        ds = getattr(loader, "dataset", None)
        if isinstance(ds, Dataset) and hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
            return cls(ds, _targets(ds), classes, getattr(loader, "num_workers", 0))
        xs, ys = [], []
        for batch in loader:
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise MDError("the training data is empty")
        y = torch.cat(ys)
        return cls(TensorDataset(torch.cat(xs), y), y.tolist(), classes)

    def __len__(self) -> int:
        return len(self.indices)

    def draw(self, seed: int, epoch: int, n: int) -> np.ndarray:
        """Epoch ``epoch``'s images: the first ``n`` of a permutation seeded by (seed, epoch),
        so a resumed search draws what an uninterrupted one would."""
        perm = np.random.default_rng([seed, epoch]).permutation(len(self.indices))
        return self.indices[perm[: min(n, len(perm))]]

    def batches(
        self, idx: np.ndarray, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, class rows)`` in ``idx`` order."""
        loader = DataLoader(Subset(self.dataset, idx.tolist()), batch_size=batch_size,
                            shuffle=False, num_workers=self.workers)  # fmt: skip
        for batch in loader:
            y = torch.as_tensor(batch[1])
            yield batch[0], torch.tensor([self.row[int(v)] for v in y])


def _targets(ds: Dataset) -> list[int]:
    """Labels of ``ds`` through subsets and transform wrappers (``base``) to a dataset that
    knows them without decoding images."""
    if isinstance(ds, Subset):
        inner = _targets(ds.dataset)
        return [inner[i] for i in ds.indices]
    base = getattr(ds, "base", None)
    if isinstance(base, Dataset) and len(base) == len(ds):  # type: ignore[arg-type]
        return _targets(base)
    return get_targets(ds)


# -- the search ----------------------------------------------------------------------------------
@dataclass
class GradResult:
    """The chosen epoch's binary masks [M, K] and heads, and every epoch's record."""

    masks: torch.Tensor
    heads: dict[str, torch.Tensor]
    best_epoch: int
    strong_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _signature(cfg: GradConfig, classes: Sequence[int], channels: Sequence[int]) -> dict:
    sig = asdict(cfg)
    for k in ("epochs", "eval_batch_size", "select_tolerance"):  # extending a search is allowed
        sig.pop(k)
    sig["classes"] = list(classes)
    sig["channels"] = list(channels)
    return sig


def choose_epoch(
    history: Sequence[dict[str, Any]],
    strong_acc: float,
    tolerance: float,
    target: float | None = None,
) -> int:
    """The epoch whose snapshot becomes the modules.

    With a kernel target: the most accurate epoch whose mean kept fraction is at most the target
    (ties: fewer kernels, then later), if there is one. Otherwise the authors' rule
    (``select_modules.py``): the fewest kernels among epochs within ``tolerance`` points of the
    strong model (ties: more accurate, then later), else the most accurate epoch."""
    if target is not None:
        under = [h for h in history if h["kept"] <= target]
        if under:
            return int(max(under, key=lambda h: (h["val_acc"], -h["kept"], h["epoch"]))["epoch"])
    ok = [h for h in history if 100 * h["val_acc"] >= 100 * strong_acc - tolerance]
    if ok:
        best = min(ok, key=lambda h: (h["kept"], -h["val_acc"], -h["epoch"]))
    else:
        best = max(history, key=lambda h: (h["val_acc"], -h["kept"], h["epoch"]))
    return int(best["epoch"])


def create_phase_optimizer(
    cfg: GradConfig, epoch: int, values: torch.Tensor, heads: ModuleHeads
) -> torch.optim.Adam:
    """A fresh Adam for the phase block ``epoch`` lies in, with GradSplitter's learning rates:
    the first head phase ``head_lr`` (heads only), a later head phase ``head_lr / 10``, a mask
    phase the masks at ``mask_lr`` and the heads at ``head_lr / 10`` (GradSplitter: 1e-3 for
    both, its mask lr)."""
    phases = schedule(cfg)
    if phases[epoch] == "mask":
        return torch.optim.Adam([{"params": [values], "lr": cfg.mask_lr},
                                 {"params": list(heads.parameters()), "lr": cfg.head_lr / 10}])  # fmt: skip
    first = _block_starts(phases)[epoch] == 0
    return torch.optim.Adam(heads.parameters(), lr=cfg.head_lr if first else cfg.head_lr / 10)


class _Search:
    """One gradient search: parameters, optimizer, and the epoch loop's pieces."""

    def __init__(self, bank, pool: TrainPool, x_val, y_val, weight, channels, cfg, device):
        self.bank, self.pool, self.cfg, self.device = bank, pool, cfg, device
        self.x_val, self.y_val = x_val, y_val.long()
        self.weight = weight.float().to(device)
        self.channels = tuple(int(c) for c in channels)
        self.m = len(pool.row)
        self.phases = schedule(cfg)
        self.starts = _block_starts(self.phases)
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def optimizer(self, values: torch.Tensor, heads: ModuleHeads, epoch: int):
        return create_phase_optimizer(self.cfg, epoch, values, heads)

    def penalty(self, kept: torch.Tensor) -> torch.Tensor:
        t = self.cfg.target_kernels
        if t is None:
            return kept.mean()
        return (
            (kept - t).abs().mean()
            if self.cfg.target_mode == "both"
            else torch.relu(kept - t).mean()
        )

    @torch.no_grad()
    def logits(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(x), self.cfg.eval_batch_size):
            out.append(self.bank(x[s : s + self.cfg.eval_batch_size].to(self.device), masks))
        return torch.cat(out, 1)

    def mask_epoch(self, values, heads, opt, idx) -> tuple[float, float]:
        ce_sum = pen_sum = 0.0
        steps = 0
        for x, y in self.pool.batches(idx, self.cfg.batch_size):
            masks = _Sign.apply(values, self.channels)
            scores = heads(self.bank(x.to(self.device), masks))  # [M, B]
            ce = F.cross_entropy(scores.t(), y.to(self.device))
            pen = self.penalty(kept_fraction(masks, self.weight))
            opt.zero_grad(set_to_none=True)
            (ce + self.cfg.kernel_alpha * pen).backward()
            opt.step()
            ce_sum, pen_sum, steps = ce_sum + ce.item(), pen_sum + pen.item(), steps + 1
        return ce_sum / steps, pen_sum / steps

    def head_epoch(self, values, heads, opt, idx) -> tuple[float, float]:
        hard = binary_masks(values.detach(), self.channels).float()
        ce_sum, steps = 0.0, 0
        for x, y in self.pool.batches(idx, self.cfg.batch_size):
            with torch.no_grad():  # masks fixed: the logits need no graph
                z = self.bank(x.to(self.device), hard)
            ce = F.cross_entropy(heads(z).t(), y.to(self.device))
            opt.zero_grad(set_to_none=True)
            ce.backward()
            opt.step()
            ce_sum, steps = ce_sum + ce.item(), steps + 1
        return ce_sum / steps, float(self.penalty(kept_fraction(hard, self.weight)))

    @torch.no_grad()
    def evaluate(self, hard: torch.Tensor, heads: ModuleHeads) -> float:
        """Composed accuracy on the validation images; their logits are re-used while the
        binary masks stay the same (every head epoch, and mask epochs that flip nothing)."""
        if self._val is None or not torch.equal(self._val[0], hard):
            self._val = (hard.clone(), self.logits(self.x_val, hard.float()))
        scores = heads(self._val[1])
        return float((scores.argmax(0).cpu() == self.y_val).float().mean())

    @torch.no_grad()
    def strong_accuracy(self, classes: Sequence[int]) -> float:
        z = self.logits(self.x_val, torch.ones(1, sum(self.channels), device=self.device))[0]
        pred = z[:, torch.as_tensor(list(classes), device=z.device)].argmax(1).cpu()
        return float((pred == self.y_val).float().mean())


def _load_state(path: Path, sig: dict, log) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise MDError(f"cannot read search state {path}: {e}") from None
    if not isinstance(state, dict) or state.get("signature") != sig:
        raise MDError(
            f"search state {path} belongs to another search (different classes, model groups "
            "or gradient-search settings); use a new output folder"
        )
    log(f"resuming the gradient search from epoch {state['epoch']}")
    return state


def run_gradient_search(
    bank: Callable[..., torch.Tensor],
    pool: TrainPool,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    weight: torch.Tensor,
    channels: Sequence[int],
    classes: Sequence[int],
    num_logits: int,
    cfg: GradConfig,
    state_path: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
    init: torch.Tensor | None = None,
) -> GradResult:
    """Run (or resume from ``state_path``) the gradient search.

    ``bank(x [B, ...], masks [M, K]) -> logits [M, B, N]`` runs the M masked modules (frozen,
    eval mode); ``x_val``/``y_val`` are the validation images and their class rows (0..M-1);
    ``weight`` [K] the kernels each mask entry stands for; ``channels`` the group sizes;
    ``init`` [M, K] the starting mask values (default: ones, as GradSplitter).
    """
    cfg.validate()
    log = log or _logger.info
    s = _Search(bank, pool, x_val, y_val, weight, channels, cfg, device)
    sig = _signature(cfg, classes, channels)
    state_path = Path(state_path) if state_path else None
    state = _load_state(state_path, sig, log) if state_path else None
    values = torch.ones(s.m, sum(s.channels), device=device)
    if init is not None:
        values.copy_(init)
    values.requires_grad_(True)
    heads = create_module_heads(s.m, num_logits, cfg.seed).to(device)
    opt = None
    if state is None:
        state = dict(version=STATE_VERSION, signature=sig, epoch=0, history=[], snapshots=[],
                     strong_acc=s.strong_accuracy(classes), opt=None)  # fmt: skip
    else:
        with torch.no_grad():
            values.copy_(state["values"])
            for p, v in zip(heads.parameters(), state["heads"]):
                p.copy_(v)
        e = state["epoch"]
        if e < cfg.epochs and e > 0 and s.starts[e] == s.starts[e - 1]:  # same phase block
            opt = s.optimizer(values, heads, e)
            opt.load_state_dict(state["opt"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc="gradient search",
                   dynamic_ncols=True)  # fmt: skip
    try:
        for epoch in range(state["epoch"], cfg.epochs):
            t0 = time.perf_counter()
            phase = s.phases[epoch]
            if opt is None or s.starts[epoch] == epoch:
                opt = s.optimizer(values, heads, epoch)
            idx = pool.draw(cfg.seed, epoch, cfg.images_per_epoch)
            run = s.mask_epoch if phase == "mask" else s.head_epoch
            ce, pen = run(values, heads, opt, idx)
            hard = binary_masks(values.detach(), s.channels)
            kept = kept_fraction(hard.float(), s.weight)
            acc = s.evaluate(hard, heads)
            loss = (
                ce + cfg.kernel_alpha * pen if phase == "mask" else ce
            )  # what the phase minimised
            rec = dict(epoch=epoch, phase=phase, loss=loss, ce=ce,
                       kept=float(kept.mean()), kept_max=float(kept.max()), val_acc=acc,
                       seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
            state["history"].append(rec)
            state["snapshots"].append(dict(masks=hard.cpu(), heads=heads.tensors()))
            best = choose_epoch(
                state["history"], state["strong_acc"], cfg.select_tolerance, cfg.target_kernels
            )
            bh = state["history"][best]
            log(
                f"epoch {epoch + 1}/{cfg.epochs} [{phase}]: loss {rec['loss']:.4f} "
                f"(ce {ce:.4f}), kernels kept {100 * rec['kept']:.1f}%, val composed "
                f"{100 * acc:.2f}% (chosen epoch {best + 1}: {100 * bh['val_acc']:.2f}% at "
                f"{100 * bh['kept']:.1f}%) {rec['seconds']:.1f} s"
            )
            state.update(epoch=epoch + 1, values=values.detach().cpu().clone(),
                         heads=[p.detach().cpu().clone() for p in heads.parameters()],
                         opt=opt.state_dict())  # fmt: skip
            if state_path is not None:
                atomic_write(state_path, lambda f: torch.save(state, f))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    phase=phase, acc=f"{100 * acc:.1f}", kept=f"{100 * rec['kept']:.0f}%"
                )
    finally:
        if bar is not None:
            bar.close()
    if not state["history"]:
        raise MDError("the gradient search ran no epoch")
    best = choose_epoch(
        state["history"], state["strong_acc"], cfg.select_tolerance, cfg.target_kernels
    )
    snap = state["snapshots"][best]
    return GradResult(snap["masks"], snap["heads"], best, state["strong_acc"], state["history"])


def gradient_modules(
    model: torch.nn.Module,
    sg: Any,
    classes: Sequence[int],
    x: torch.Tensor,
    y: torch.Tensor,
    val_index: np.ndarray,
    train_loader: Iterable,
    cfg: GradConfig,
    *,
    state_path: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
    min_confidence: float = 0.9,
):
    """The gradient search, as bound :class:`~.modules.SplitModules` with heads (not measured).

    ``x``, ``y``: the validation images of ``classes`` (labels in the model's output space);
    ``val_index`` the ones that choose the epoch; ``train_loader`` the training images the masks
    learn on (:meth:`TrainPool.from_loader`). Called by :func:`~.split.modularize`, which sets
    ``cfg.target_kernels`` for ``mask_init='auto'`` (:func:`~.gradinit.sensitivity_target`).
    """
    from .bank import ModuleBank
    from .head import HEAD_HIDDEN
    from .modules import create_split_modules

    log = log or _logger.info
    with torch.no_grad():
        n_out = int(model(x[:1].to(device)).shape[1])
    pool = TrainPool.from_loader(train_loader, classes)
    row = {int(c): i for i, c in enumerate(classes)}
    y_rows = torch.tensor([row[int(v)] for v in y[val_index]])
    channels = [g.channels for g in sg.groups]
    weight = torch.cat([torch.full((g.channels,), float(g.kernels)) for g in sg.groups])
    bank = ModuleBank(sg).to(device)
    if cfg.mask_init == "auto" and cfg.target_kernels is None:
        raise ConfigError("mask_init 'auto' takes its kernel target from the layer sensitivity")
    init = None
    if cfg.mask_init == "importance":
        init = importance_init(sg, x, y, classes, min_confidence, cfg.eval_batch_size, device)
    log(
        f"gradient search: {len(classes)} modules x {sum(channels)} mask entries, {cfg.epochs} "
        f"epochs of {min(cfg.images_per_epoch, len(pool))} of {len(pool)} training images, "
        f"{len(val_index)} val images choose the epoch"
    )
    res = run_gradient_search(bank, pool, x[val_index], y_rows, weight, channels, classes, n_out,
                              cfg, state_path, progress, log, device, init)  # fmt: skip
    masks = [list(torch.split(res.masks[i], channels)) for i in range(len(classes))]
    opts = dict(
        source="gradient",
        config=asdict(cfg),
        best_epoch=res.best_epoch,
        strong_val_acc=res.strong_acc,
        history=res.history,
        head=dict(
            kind="gradsplitter",
            hidden=HEAD_HIDDEN,
            logits=n_out,
            rule="sigmoid(W2 relu(W1 relu(logits) + b1) + b2)",
        ),
    )
    mods = create_split_modules(model, sg, classes, masks, opts)
    mods.heads = res.heads
    return mods
