"""Diagnosis: which channels of each target layer every class relies on.

For each class we keep the N most confident *correctly classified* images seen in the loader,
and sum, over those images and over space, the positive part (or magnitude) of the gradient of
the image's own class logit w.r.t. the layer output. One batched backward per batch gives every
per-sample gradient at once: the model is in eval mode, so BatchNorm does not couple samples and
d(sum_b z[b, y_b])/dA_b = dz[b, y_b]/dA_b exactly. Gradients are reduced over space immediately
and the top-N per class is kept as a streaming buffer, so memory is O(classes x N x channels)
whatever the dataset size. Across processes each rank keeps its own top-N and the buffers are
merged at the end, so every rank ends with identical masks.

"Most confident" is ranked by the true class's log-odds in float64,
``z_y - logsumexp_{k != y} z_k = log(p_y / (1 - p_y))``: monotone in the softmax probability,
so it orders images exactly as the probability would with infinite precision, but it does not
saturate. A trained network gives many training images a float32 softmax of exactly 1.0 (443 of
10,000 for the 30-epoch resnet20_cifar in shared/checkpoints; a float64 log-softmax saturates
too, at margins above ~37), and the official code's "top N by softmax" then picks arbitrarily
among the ties. Exact ties left are broken by the dataset index (lower first), so the selection
is deterministic. A deliberate difference from the official code.
"""

from __future__ import annotations

import itertools
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..errors import ConfigError, MDError
from ..layers import FeatureCapture, LayerRef, resolve_layers
from .masks import MASK_RULES, check_mask_options, compute_masks
from .record import GRAD_MODES, Diagnosis, LayerDiagnosis, model_fingerprint

__all__ = [
    "Diagnosis",
    "LayerDiagnosis",
    "diagnose",
    "model_fingerprint",
    "shard_dataset",
    "true_class_log_odds",
    "GRAD_MODES",
]

_logger = logging.getLogger(__name__)


def true_class_log_odds(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log(p_y / (1 - p_y)) = z_y - logsumexp_{k != y} z_k`` per sample, in float64.

    Ranks samples like the true-class softmax probability, without saturating at p = 1.

    Args:
        logits: ``[B, K]`` logits.
        targets: ``[B]`` class indices.

    Returns:
        ``[B]`` float64 log-odds of each sample's own class.
    """
    z = logits.detach().double()
    own = z.gather(1, targets[:, None]).squeeze(1)
    others = z.scatter(1, targets[:, None], float("-inf"))
    return own - others.logsumexp(1)


def channel_grad(g: torch.Tensor, mode: str, act: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a gradient [B, C, *positions] to per-channel mass [B, C] (positive part or
    magnitude). Pass channels-first tensors (:meth:`LayerRef.channels_first`).

    With ``act`` given, only positions where the activation is positive count (the lab fork's
    best variant: gradient gated by positive activation).

    Args:
        g: The gradient, channels first.
        mode: ``relu`` (positive part) or ``abs`` (magnitude).
        act: The layer's activation, channels first (optional gate).

    Returns:
        ``[B, C]`` float per-channel gradient mass.
    """
    g = g.float()
    if act is not None:
        g = g * (act > 0)
    g = g.clamp_min(0) if mode == "relu" else g.abs()
    return g.flatten(2).sum(2) if g.dim() > 2 else g


class _TopN:
    """Per-class buffer of the N top-ranked samples and their per-channel gradients.

    Samples are ranked by ``key`` (higher first), exact ties by dataset index (lower first).
    """

    def __init__(self, num_classes: int, n: int, widths: Sequence[int]):
        self.n = n
        self.conf = torch.full((num_classes, n), float("-inf"), dtype=torch.float64)
        self.index = torch.full((num_classes, n), torch.iinfo(torch.int64).max)
        self.vecs = [torch.zeros(num_classes, n, c) for c in widths]

    @staticmethod
    def _order(key: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        """Positions of the ``n`` best along the last dim: key descending, then index ascending."""
        by_index = index.argsort(dim=-1, stable=True)
        by_key = key.gather(-1, by_index).argsort(dim=-1, descending=True, stable=True)
        return by_index.gather(-1, by_key)[..., :n]

    def add(
        self,
        labels: torch.Tensor,
        key: torch.Tensor,
        index: torch.Tensor,
        vecs: Sequence[torch.Tensor],
    ) -> None:
        for k in labels.unique().tolist():
            sel = labels == k
            cat_key = torch.cat([self.conf[k], key[sel].double()])
            cat_idx = torch.cat([self.index[k], index[sel]])
            top = self._order(cat_key, cat_idx, self.n)
            self.conf[k] = cat_key[top]
            self.index[k] = cat_idx[top]
            for buf, v in zip(self.vecs, vecs):
                buf[k] = torch.cat([buf[k], v[sel]])[top]

    def merge_from(
        self, conf: torch.Tensor, index: torch.Tensor, vecs: Sequence[torch.Tensor]
    ) -> None:
        """Merge buffers gathered from all ranks: conf/index [W, K, N], vecs [W, K, N, C]."""
        w, k, n = conf.shape
        allc = conf.permute(1, 0, 2).reshape(k, w * n)
        alli = index.permute(1, 0, 2).reshape(k, w * n)
        top = self._order(allc, alli, self.n)
        self.conf = allc.gather(1, top)
        self.index = alli.gather(1, top)
        for i, v in enumerate(vecs):
            allv = v.permute(1, 0, 2, 3).reshape(k, w * n, -1)
            self.vecs[i] = allv.gather(1, top[..., None].expand(-1, -1, allv.shape[-1]))

    @property
    def valid(self) -> torch.Tensor:
        return torch.isfinite(self.conf)


def diagnose(
    model: nn.Module,
    loader: Iterable,
    layers: str | Sequence[str] | Sequence[LayerRef] = "last_conv",
    num_classes: int | None = None,
    *,
    per_class: int = 50,
    min_confidence: float = 0.0,
    grad_mode: str = "relu",
    gate_activation: bool = False,
    mask_rule: str = "theta",
    theta: float = 0.2,
    topk: int | None = None,
    accelerator: Any = None,
    progress: bool = False,
    input_size: Sequence[int] | None = None,
) -> Diagnosis:
    """Diagnose ``model`` on the images of ``loader`` (use the TRAINING split, eval transforms).

    ``loader`` yields ``(images, targets, ...)``. Layer specs are resolved at the size of the
    first batch's images unless ``input_size`` is given (a spec such as ``last_conv`` can pick
    another layer at another size). With an ``accelerator`` each rank's loader
    should hold its own shard of the images, each image on exactly one rank (see
    :func:`shard_dataset`; a prepared loader pads with repeats), and the per-rank buffers are
    gathered so every rank gets the same result. Images are ranked by the true class's float64
    log-odds (:func:`true_class_log_odds`), ties by dataset index; ``min_confidence`` is a floor
    on the softmax probability.

    Args:
        model: The trained classifier (put in eval mode for the pass, then restored).
        loader: Yields ``(images, class indices, ...)``.
        layers: Layer specs (``last_conv``, ``penultimate_fc``, names, globs) or resolved refs.
        num_classes: The model's number of outputs (default ``model.num_classes``).
        per_class: Images kept per class (the N most confident correct ones).
        min_confidence: Floor on the true-class softmax probability.
        grad_mode: ``relu`` (positive part of the gradient) or ``abs``.
        gate_activation: Count only positions where the activation is positive.
        mask_rule: How scores become masks (``theta``, ``mean``, ``topk``).
        theta: The ``theta`` rule's min-max threshold.
        topk: The ``topk`` rule's channels per class.
        accelerator: An ``accelerate.Accelerator`` for a multi-process pass.
        progress: Show a progress bar.
        input_size: ``(C, H, W)`` to resolve the layers at (default: the first batch's).

    Returns:
        The :class:`Diagnosis` (identical on every rank).

    Raises:
        ConfigError: A bad option.
        MDError: One line for labels that are not class indices in range, a ``num_classes``
            that is not the model's output width, or images the model cannot take.
    """
    _check_options(grad_mode, mask_rule, per_class, min_confidence)
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
        if not num_classes:
            raise ConfigError("num_classes is required for this model")
    batches, input_size = _peek_input_size(loader, input_size)
    if isinstance(layers, str) or (layers and isinstance(next(iter(layers)), str)):
        with _input_errors():  # the trace is the first forward: it meets a wrong input first
            refs = resolve_layers(model, layers, input_size=input_size)  # type: ignore[arg-type]
    else:
        refs = list(layers)  # type: ignore[arg-type]
    # the mask options are used only after the whole pass: refuse bad ones before it
    check_mask_options(mask_rule, theta, topk, min(r.channels for r in refs))
    if progress:
        total = len(loader) if hasattr(loader, "__len__") else None
        batches = tqdm(batches, desc="diagnose", leave=False, dynamic_ncols=True, total=total)
    buf = _TopN(num_classes, per_class, [r.channels for r in refs])
    # dataset index of the running position (a sharded loader holds items rank, rank + world, ...)
    world = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
    rank = getattr(accelerator, "process_index", 0) if accelerator is not None else 0
    seen = _scan(
        model, batches, refs, buf, num_classes, min_confidence, grad_mode, gate_activation,
        rank, world,
    )  # fmt: skip
    if world > 1:
        buf.merge_from(
            _gather(accelerator, buf.conf),
            _gather(accelerator, buf.index),
            [_gather(accelerator, v) for v in buf.vecs],
        )
        seen = int(_gather(accelerator, torch.tensor([seen])).sum())
    counts = buf.valid.sum(1)
    out = _layer_diagnoses(refs, buf, counts, mask_rule, theta, topk)
    options = dict(
        per_class=per_class,
        min_confidence=min_confidence,
        grad_mode=grad_mode,
        gate_activation=gate_activation,
        mask_rule=mask_rule,
        theta=theta,
        topk=topk,
        images_seen=seen,
        rank_by="log_odds_fp64",
        input_size=list(input_size) if input_size is not None else None,
    )
    _logger.debug("diagnosed %d images, %d used", seen, int(counts.sum()))
    # the weights hash lets Diagnosis.load(path, model) tell other weights of this architecture
    return Diagnosis(out, counts, model_fingerprint(model, refs, weights=True), options)


def _check_options(grad_mode: str, mask_rule: str, per_class: int, min_confidence: float) -> None:
    """Refuse a bad option of :func:`diagnose` in one line, before any work."""
    if grad_mode not in GRAD_MODES:
        raise ConfigError(f"grad mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if mask_rule not in MASK_RULES:
        raise ConfigError(f"mask rule must be one of {MASK_RULES}, got {mask_rule!r}")
    if per_class < 1:
        raise ConfigError(f"images per class must be >= 1, got {per_class}")
    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"minimum confidence must be in [0, 1], got {min_confidence}")


def _peek_input_size(
    loader: Iterable, input_size: Sequence[int] | None
) -> tuple[Iterable, Sequence[int] | None]:
    """The batches, and the input size: given (the loader is not touched before the option
    checks), or that of the first batch's images (one batch is read ahead and put back, so the
    pass still sees every image)."""
    if input_size is not None:
        return loader, input_size
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        return batches, None
    if isinstance(first[0], torch.Tensor):
        input_size = tuple(first[0].shape[1:])
    return itertools.chain([first], batches), input_size


def _layer_diagnoses(
    refs: Sequence[LayerRef],
    buf: _TopN,
    counts: torch.Tensor,
    mask_rule: str,
    theta: float,
    topk: int | None,
) -> dict[str, LayerDiagnosis]:
    """Per layer, the kept images' summed scores and their masks; a warning for a class with no
    image and for a layer whose every gradient is zero."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        warnings.warn(
            f"{len(empty)} class(es) have no correctly classified image above the confidence "
            f"floor: {empty[:20]}{'...' if len(empty) > 20 else ''}. Their masks mark every "
            "channel relevant (no channel penalty for them).",
            stacklevel=3,
        )
    out: dict[str, LayerDiagnosis] = {}
    for ref, vec in zip(refs, buf.vecs):
        scores = (vec * buf.valid[..., None]).sum(1)
        if scores.abs().sum() == 0 and counts.sum() > 0:
            warnings.warn(
                f"every gradient at layer {ref.name!r} is zero: the layer does not influence the "
                "logits (e.g. a zero-initialised BatchNorm after it)",
                stacklevel=3,
            )
        out[ref.name] = LayerDiagnosis(
            ref.name, scores, compute_masks(scores, counts, mask_rule, theta, topk)
        )
    return out


def _scan(
    model: nn.Module,
    batches: Iterable,
    refs: Sequence[LayerRef],
    buf: _TopN,
    num_classes: int,
    min_confidence: float,
    grad_mode: str,
    gate_activation: bool,
    rank: int,
    world: int,
) -> int:
    """The gradient pass of :func:`diagnose`: fill ``buf``; return the number of images seen."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with FeatureCapture(model, refs, graph_from_first=True) as cap:
            for batch in batches:
                x = batch[0].to(device)
                with torch.no_grad(), _input_errors():  # recording starts at the first layer
                    logits = model(x)
                y = _checked_labels(batch[1], logits, num_classes).to(device)
                feats = cap.features()
                own = logits.gather(1, y[:, None]).sum()
                grads = torch.autograd.grad(own, feats)
                with torch.no_grad():
                    prob = logits.double().softmax(1)
                    conf = prob.gather(1, y[:, None]).squeeze(1)
                    ok = (logits.argmax(1) == y) & (conf >= min_confidence)
                    key = true_class_log_odds(logits, y)
                    index = rank + world * (seen + torch.arange(len(y), device=y.device))
                    vecs = [
                        channel_grad(
                            r.channels_first(g),
                            grad_mode,
                            r.channels_first(a) if gate_activation else None,
                        )[ok].cpu()
                        for r, g, a in zip(refs, grads, feats)
                    ]
                    buf.add(y[ok].cpu(), key[ok].cpu(), index[ok].cpu(), vecs)
                seen += len(y)
                cap.clear()
    finally:
        model.train(was_training)
    return seen


# torch's message when the images' channels do not match the first conv (1-channel images for
# an RGB model): the one input mistake worth naming, the rest stay tracebacks
_CHANNELS = re.compile(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+)")


@contextmanager
def _input_errors() -> Iterator[None]:
    """Turn a channel-count mismatch between the images and the model into one MDError line."""
    try:
        yield
    except RuntimeError as e:
        m = _CHANNELS.search(str(e))
        if m is None:
            raise
        want, got = int(m.group(2)), int(m.group(3))
        raise MDError(
            f"the images have {got} channel(s) but the model takes {want} (input "
            f"[{m.group(1)}]): convert the images (e.g. grayscale to RGB) or create the model "
            f"with in_chans={got}"
        ) from None


def _checked_labels(y: Any, logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The batch's labels as int64 class indices, or one MDError line saying what is wrong."""
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise MDError(
            f"diagnose was given num_classes={num_classes} but the model outputs "
            f"{tuple(logits.shape[1:])} per image; pass the model's number of classes"
        )
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise MDError(
            f"the loader's labels are {str(y.dtype)[6:]}, not integer class indices (one-hot or "
            "soft targets?): diagnose needs each image's class index"
        )
    if y.dim() != 1 or len(y) != len(logits):
        raise MDError(
            f"the loader gave labels of shape {tuple(y.shape)} for {len(logits)} images; "
            "diagnose needs one class index per image"
        )
    bad = y[(y < 0) | (y >= num_classes)]
    if len(bad):
        raise MDError(
            f"the loader gave label {int(bad[0])}, out of range for {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    return y.long()


def shard_dataset(dataset: Any, num_processes: int = 1, process_index: int = 0) -> Any:
    """This rank's share of ``dataset`` for :func:`diagnose`: items ``rank, rank + world, ...``.

    Every item lands on exactly one rank. ``accelerator.prepare`` on a loader instead pads the
    last batches with repeated items (``even_batches``), and a repeated image can fill two of a
    class's top-N slots, so the multi-process diagnosis would differ from the single-process one.

    Args:
        dataset: A map-style dataset.
        num_processes: The number of ranks.
        process_index: This rank.

    Returns:
        ``dataset`` itself for one process, else a :class:`~torch.utils.data.Subset`.
    """
    if num_processes <= 1:
        return dataset
    return Subset(dataset, range(process_index, len(dataset), num_processes))


def _gather(accelerator: Any, t: torch.Tensor) -> torch.Tensor:
    """all_gather a CPU buffer through the accelerator's device and stack it per rank."""
    g = accelerator.gather(t.to(accelerator.device)[None].contiguous())
    return g.cpu()
