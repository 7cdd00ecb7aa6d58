"""Classification losses for long-tailed training, created by name.

All losses share one base class so the two ways of re-weighting are implemented once:

* a fixed per-class ``weight`` (class-balanced losses), and
* deferred re-weighting (DRW, Cao et al. 2019): plain loss until ``drw_epoch``, then weighted
  by class-balanced effective-number weights. DRW is a switch on the base class, so it applies
  to ``ce``, ``focal``, ``reduced_focal`` and ``ldam`` alike; ``set_epoch`` flips it.

Weighted means. Cui et al. define the class-balanced loss as ``sum_i w_{y_i} l_i / N`` with
``sum_c w_c = C``; torch's ``cross_entropy(weight=...)`` instead divides by ``sum_i w_{y_i}``,
which cancels the overall scale of the weights in every batch. The two differ a lot on a long
tail (head samples dominate a batch and carry small weights, so ``/N`` shrinks the loss). We use
each paper's own choice: ``/N`` for ``cb_ce``/``cb_focal`` (Cui et al.), torch's weighted mean
for the DRW phase (the official LDAM-DRW code calls ``F.cross_entropy(..., weight=w)``).

Targets are integer class indices; mixup/cutmix soft targets are refused with a clear error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "ClassificationLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "ReducedFocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "class_balanced_weights",
    "ldam_margins",
    "log_prior",
    "register_loss",
    "list_losses",
    "create_loss",
]

_LOSSES: dict[str, Callable[..., ClassificationLoss]] = {}
WEIGHT_NORMS = ("batch", "weight")


# --- class-count helpers ------------------------------------------------------------------


def _counts(cls_num_list: Sequence[int] | torch.Tensor | None, loss: str) -> torch.Tensor:
    if cls_num_list is None:
        raise ConfigError(
            f"loss {loss!r} needs the number of training images per class (cls_num_list)"
        )
    counts = torch.as_tensor(cls_num_list, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0 or bool((counts <= 0).any()):
        raise ConfigError(
            f"loss {loss!r} needs a positive image count for every class, got {counts.tolist()}"
        )
    return counts


def class_balanced_weights(cls_num_list: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Cui et al. 2019: ``w_c = (1 - beta) / (1 - beta ** n_c)``, rescaled so ``sum w_c = C``.

    ``(1 - beta ** n) / (1 - beta)`` is the "effective number" of samples of a class: the
    expected volume it covers when new samples increasingly overlap old ones.
    """
    if not 0.0 <= float(beta) < 1.0:
        raise ConfigError(f"cb_beta must be in [0, 1), got {beta!r}")
    n = _counts(cls_num_list, "class-balanced weights")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(float(beta), dtype=torch.float64), n))
    return (w * len(n) / w.sum()).float()


def ldam_margins(cls_num_list: Sequence[int], max_m: float = 0.5) -> torch.Tensor:
    """Cao et al. 2019: ``m_c ∝ n_c ** (-1/4)``, scaled so the rarest class gets ``max_m``."""
    if float(max_m) <= 0:
        raise ConfigError(f"ldam_max_m must be > 0, got {max_m!r}")
    m = _counts(cls_num_list, "ldam").pow(-0.25)
    return (m * (max_m / m.max())).float()


def log_prior(cls_num_list: Sequence[int]) -> torch.Tensor:
    """``log(n_c / N)``: the training label prior that logit adjustment adds to the logits."""
    n = _counts(cls_num_list, "logit adjustment")
    return torch.log(n / n.sum()).float()


# --- base class ---------------------------------------------------------------------------


class ClassificationLoss(nn.Module):
    """Per-sample loss reduced to a (weighted) mean, with optional deferred re-weighting.

    Subclasses implement ``per_sample(logits, target) -> Tensor[N]``. ``weight`` (per class)
    is applied with ``weight_norm``: ``'batch'`` = ``sum w_y l / N`` (Cui et al.), ``'weight'``
    = ``sum w_y l / sum w_y`` (torch). With ``drw_epoch`` set, ``set_epoch(e)`` for
    ``e >= drw_epoch`` replaces ``weight`` by ``drw_weight`` (torch normalisation, as LDAM-DRW).
    Weights are non-persistent buffers: they follow ``.to(device)`` but are derived from the
    config, so a checkpoint neither stores nor expects them; resuming calls ``set_epoch``.
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor | Sequence[float] | None = None,
        weight_norm: str = "batch",
        drw_epoch: int | None = None,
        drw_weight: torch.Tensor | Sequence[float] | None = None,
    ):
        super().__init__()
        if weight_norm not in WEIGHT_NORMS:
            raise ConfigError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
        if drw_epoch is not None and not _is_epoch(drw_epoch):
            raise ConfigError(f"drw_epoch must be an epoch index >= 0, got {drw_epoch!r}")
        if (drw_epoch is None) != (drw_weight is None):
            raise ConfigError("deferred re-weighting needs both drw_epoch and drw_weight")
        self.register_buffer("static_weight", _as_weight(weight), persistent=False)
        self.register_buffer("drw_weight", _as_weight(drw_weight), persistent=False)
        self.register_buffer("weight", self.static_weight, persistent=False)
        self.static_norm = weight_norm
        self.weight_norm = weight_norm
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Switch to the DRW weights from ``drw_epoch`` on; a no-op without DRW."""
        if self.drw_epoch is not None and epoch >= self.drw_epoch:
            self.weight, self.weight_norm = self.drw_weight, "weight"
        else:
            self.weight, self.weight_norm = self.static_weight, self.static_norm

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logits, target, self)
        # float32 even under autocast: exp/log of fp16 logits (scaled by s=30 in LDAM) overflow
        loss = self.per_sample(logits.float(), target)
        if self.weight is None:
            return loss.mean()
        w = self.weight[target]
        return (w * loss).sum() / (w.sum() if self.weight_norm == "weight" else loss.numel())

    def extra_repr(self) -> str:
        drw = f", drw_epoch={self.drw_epoch}" if self.drw_epoch is not None else ""
        return f"weighted={self.static_weight is not None}, weight_norm={self.static_norm!r}{drw}"


def _is_epoch(value: object) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value and int(value) >= 0  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False


def _as_weight(w: torch.Tensor | Sequence[float] | None) -> torch.Tensor | None:
    return None if w is None else torch.as_tensor(w, dtype=torch.float32).reshape(-1)


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, loss: ClassificationLoss) -> None:
    if target.dim() != 1 or target.dtype.is_floating_point:
        raise ConfigError(
            f"{type(loss).__name__} needs integer class targets of shape [N], got "
            f"{target.dtype} {tuple(target.shape)} (mixup/cutmix soft targets are not supported)"
        )
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected logits [N, C] and targets [N], got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    num_classes = logits.shape[-1]
    # every buffer of a ClassificationLoss is per class (weights, margins, prior)
    for buf in loss.buffers(recurse=False):
        if buf.numel() != num_classes:
            raise ConfigError(
                f"{type(loss).__name__} was set up for {buf.numel()} classes but the model "
                f"outputs {num_classes} logits"
            )


def _target_logp(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)


# --- losses -------------------------------------------------------------------------------


class CrossEntropyLoss(ClassificationLoss):
    """Cross-entropy; ``smoothing`` mixes the target with the uniform distribution."""

    def __init__(self, smoothing: float = 0.0, **base):
        if not 0.0 <= float(smoothing) < 1.0:
            raise ConfigError(f"smoothing must be in [0, 1), got {smoothing!r}")
        super().__init__(**base)
        self.smoothing = float(smoothing)

    def per_sample(self, logits, target):
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=self.smoothing)


class FocalLoss(ClassificationLoss):
    """Lin et al. 2017: ``(1 - p_t) ** gamma * CE``, down-weighting already-easy samples."""

    def __init__(self, gamma: float = 2.0, **base):
        if float(gamma) < 0:
            raise ConfigError(f"focal_gamma must be >= 0, got {gamma!r}")
        super().__init__(**base)
        self.gamma = float(gamma)

    def per_sample(self, logits, target):
        logp_t = _target_logp(logits, target)
        return (1.0 - logp_t.exp()).pow(self.gamma) * -logp_t


class ReducedFocalLoss(ClassificationLoss):
    """Sergievskiy & Ponamarev 2019: plain CE below ``threshold``, focal-style decay above it.

    ``w = 1`` if ``p_t < th`` else ``(1 - p_t) ** gamma / th ** gamma``; loss ``w * CE``. Hard
    samples keep the full CE gradient (focal loss damps them too), easy ones are damped. As in
    focal loss, ``w`` is part of the loss and is NOT detached: it contributes to the gradient.
    ``th = 1`` never reaches the focal branch (for ``p_t < 1``), so the loss is plain CE.
    """

    def __init__(self, gamma: float = 2.0, threshold: float = 0.5, **base):
        if float(gamma) < 0:
            raise ConfigError(f"focal_gamma must be >= 0, got {gamma!r}")
        if not 0.0 < float(threshold) <= 1.0:
            raise ConfigError(f"rfl_threshold must be in (0, 1], got {threshold!r}")
        super().__init__(**base)
        self.gamma, self.threshold = float(gamma), float(threshold)

    def per_sample(self, logits, target):
        logp_t = _target_logp(logits, target)
        p_t = logp_t.exp()
        decay = (1.0 - p_t).pow(self.gamma) / self.threshold**self.gamma
        w = torch.where(p_t < self.threshold, torch.ones_like(p_t), decay)
        return w * -logp_t


class LDAMLoss(ClassificationLoss):
    """Cao et al. 2019: label-distribution-aware margins, ``CE(s * (z - m_y e_y))``.

    Rare classes get larger margins (``m_c ∝ n_c ** -1/4``); ``s`` rescales the logits because
    the margins are meant for normalised (cosine-like) logits.
    """

    def __init__(self, cls_num_list: Sequence[int], max_m: float = 0.5, s: float = 30.0, **base):
        if float(s) <= 0:
            raise ConfigError(f"ldam_s must be > 0, got {s!r}")
        super().__init__(**base)
        self.register_buffer("margins", ldam_margins(cls_num_list, max_m), persistent=False)
        self.max_m, self.s = float(max_m), float(s)

    def per_sample(self, logits, target):
        shift = torch.zeros_like(logits).scatter_(
            -1, target[:, None], self.margins[target, None].to(logits.dtype)
        )
        return F.cross_entropy(self.s * (logits - shift), target, reduction="none")


class LogitAdjustedLoss(ClassificationLoss):
    """Menon et al. 2021 logit-adjusted loss: ``CE(z + tau * log prior)``.

    Training against the prior-shifted logits makes the raw logits estimate the balanced
    posterior. ``tau = 1`` is Balanced Softmax (Ren et al. 2020); ``tau = 0`` is plain CE.
    """

    def __init__(self, cls_num_list: Sequence[int], tau: float = 1.0, **base):
        super().__init__(**base)
        self.tau = float(tau)
        self.register_buffer("adjustment", self.tau * log_prior(cls_num_list), persistent=False)

    def per_sample(self, logits, target):
        return F.cross_entropy(logits + self.adjustment, target, reduction="none")


# --- registry -----------------------------------------------------------------------------


def register_loss(name: str | Callable | None = None):
    """Register a loss factory, as ``@register_loss`` (its ``__name__``) or ``@register_loss('x')``.

    ``create_loss`` passes a factory only the keyword arguments its signature names.
    """
    if callable(name):
        _LOSSES[name.__name__] = name
        return name

    def wrap(fn: Callable[..., ClassificationLoss]) -> Callable[..., ClassificationLoss]:
        _LOSSES[name or fn.__name__] = fn
        return fn

    return wrap


def _drw(cls_num_list, cb_beta: float, drw_epoch: int | None, loss: str) -> dict:
    if drw_epoch is None:
        return {}
    return {
        "drw_epoch": drw_epoch,
        "drw_weight": class_balanced_weights(_need(cls_num_list, loss), cb_beta),
    }


def _need(cls_num_list, loss: str):
    _counts(cls_num_list, loss)  # raises a ConfigError naming the loss
    return cls_num_list


@register_loss("ce")
def _ce(*, smoothing=0.0, cls_num_list=None, cb_beta=0.9999, drw_epoch=None):
    return CrossEntropyLoss(smoothing, **_drw(cls_num_list, cb_beta, drw_epoch, "ce"))


@register_loss("focal")
def _focal(*, focal_gamma=2.0, cls_num_list=None, cb_beta=0.9999, drw_epoch=None):
    return FocalLoss(focal_gamma, **_drw(cls_num_list, cb_beta, drw_epoch, "focal"))


@register_loss("reduced_focal")
def _reduced_focal(*, focal_gamma=2.0, rfl_threshold=0.5, cls_num_list=None, cb_beta=0.9999,
                   drw_epoch=None):  # fmt: skip
    drw = _drw(cls_num_list, cb_beta, drw_epoch, "reduced_focal")
    return ReducedFocalLoss(focal_gamma, rfl_threshold, **drw)


@register_loss("cb_ce")
def _cb_ce(*, cls_num_list=None, cb_beta=0.9999):
    w = class_balanced_weights(_need(cls_num_list, "cb_ce"), cb_beta)
    return CrossEntropyLoss(weight=w, weight_norm="batch")


@register_loss("cb_focal")
def _cb_focal(*, cls_num_list=None, cb_beta=0.9999, focal_gamma=2.0):
    # Cui et al. pair the weights with a sigmoid focal loss; this is the softmax focal loss
    # used everywhere else here, so cb_focal vs focal isolates the effect of the weights
    w = class_balanced_weights(_need(cls_num_list, "cb_focal"), cb_beta)
    return FocalLoss(focal_gamma, weight=w, weight_norm="batch")


@register_loss("ldam")
def _ldam(*, cls_num_list=None, ldam_max_m=0.5, ldam_s=30.0, cb_beta=0.9999, drw_epoch=None):
    drw = _drw(cls_num_list, cb_beta, drw_epoch, "ldam")
    return LDAMLoss(_need(cls_num_list, "ldam"), ldam_max_m, ldam_s, **drw)


@register_loss("balanced_softmax")
def _balanced_softmax(*, cls_num_list=None):
    return LogitAdjustedLoss(_need(cls_num_list, "balanced_softmax"), tau=1.0)


@register_loss("logit_adjust")
def _logit_adjust(*, cls_num_list=None, la_tau=1.0):
    return LogitAdjustedLoss(_need(cls_num_list, "logit_adjust"), tau=la_tau)


def list_losses() -> list[str]:
    """Registered loss names."""
    return sorted(_LOSSES)


def create_loss(
    name: str,
    *,
    cls_num_list: Sequence[int] | None = None,
    smoothing: float = 0.0,
    focal_gamma: float = 2.0,
    rfl_threshold: float = 0.5,
    cb_beta: float = 0.9999,
    ldam_max_m: float = 0.5,
    ldam_s: float = 30.0,
    la_tau: float = 1.0,
    drw_epoch: int | None = None,
) -> ClassificationLoss:
    """Build the loss ``name``; options a loss does not use are ignored.

    ``drw_epoch`` is the exception: it changes the objective, so asking for it with a loss that
    has no deferred re-weighting (the class-balanced and logit-adjusted ones) is an error rather
    than a silent no-op.
    """
    key = (name or "").strip().lower().replace("-", "_")
    if key not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(list_losses())}")
    factory = _LOSSES[key]
    options = dict(
        cls_num_list=cls_num_list, smoothing=smoothing, focal_gamma=focal_gamma,
        rfl_threshold=rfl_threshold, cb_beta=cb_beta, ldam_max_m=ldam_max_m, ldam_s=ldam_s,
        la_tau=la_tau, drw_epoch=drw_epoch,
    )  # fmt: skip
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**options)
    if drw_epoch is not None and "drw_epoch" not in params:
        with_drw = [n for n, f in _LOSSES.items() if "drw_epoch" in inspect.signature(f).parameters]
        raise ConfigError(
            f"loss {key!r} does not support deferred re-weighting (drw_epoch); "
            f"use one of {', '.join(sorted(with_drw))}"
        )
    return factory(**{k: v for k, v in options.items() if k in params})
