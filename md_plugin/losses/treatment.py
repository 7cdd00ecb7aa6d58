"""Model Doctor treatment losses: channel and spatial gradient constraints.

Usable in any training loop::

    md = ModelDoctor(model, diagnosis, alpha=0.1)   # registers forward hooks
    logits = model(x)                                # features captured on the side
    md_loss, parts = md.loss(logits, y)              # differentiable (create_graph=True)
    (criterion(logits, y) + md_loss).backward()

Formulation (official Model Doctor, per-sample normalised). With G(k)_b = dz[b, k]/dA_b the
gradient of sample b's class-k logit w.r.t. a target layer output A:

    channel_b = sum_c relu(G(y_b))_b[c] * (1 - M[y_b, c])       (true class, irrelevant channels)
              + sum_c relu(G(t'_b))_b[c] * M[t'_b, c]           (confusing class, its own channels)
    L_channel = alpha * mean_b channel_b ,   relu(G)[c] = sum_hw max(G[c, h, w], 0)

t'_b is the 2nd-ranked class when the prediction is right, else the wrong top-1. The official code
differentiates -NLL = (1/B) sum_b z[b, y_b] and then averages over the batch again, so its
effective weight is alpha_official / B^2 on the sum; ours is alpha / B, hence
``alpha = alpha_official / batch_size`` reproduces the official loss (and ours does not change
meaning with the batch size). Spatial term, for samples with a foreground mask m_b:

    L_spatial = beta * (1/B) * sum_b sum_{c,h,w} |(1 - R(m_b)) * G(y_b)_b|

where R area-resizes the mask to H x W (fraction of foreground per cell), unannotated samples
contribute 0 and 1/B keeps beta independent of the batch size.

Gradients for every layer come from one ``autograd.grad`` call per class term (true, confusing),
and the spatial term reuses G(y). ``batched=True`` gets both class terms from a single vmapped
call (``is_grads_batched``); on CPU it measured slower than two plain calls
(``benchmarks/bench_treatment.py``), so it is off by default.

Lazy regularisation (``every=k``, as StyleGAN2 does for its R1 penalty): the terms are computed
only on every k-th optimizer step, with alpha and beta multiplied by k, so the penalty's average
weight per step is unchanged while the average step costs about ``1 + (r - 1) / k`` plain steps
(r: the cost ratio of a penalised step). Call :meth:`ModelDoctor.begin_step` with the optimizer
step index before each forward pass; ``every=1`` (the default) is exactly the per-step loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..doctor.diagnosis import Diagnosis
from ..errors import ConfigError
from ..layers import FeatureCapture, LayerRef, resolve_layers

__all__ = ["ModelDoctor", "check_wrapped_model", "confusing_class", "resize_mask"]


def confusing_class(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """2nd-ranked class where the top-1 is right, else the (wrong) top-1."""
    top2 = logits.detach().topk(2, dim=1).indices
    return torch.where(top2[:, 0] == targets, top2[:, 1], top2[:, 0])


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, 1, h, w] foreground mask -> [B, 1, H, W] foreground fraction (area interpolation)."""
    mask = mask if mask.is_floating_point() else mask.float()
    return F.interpolate(mask, size=tuple(size), mode="area")


class ModelDoctor:
    """Channel (and spatial) gradient penalties for the layers of a :class:`Diagnosis`."""

    def __init__(
        self,
        model: nn.Module,
        diagnosis: Diagnosis,
        alpha: float = 0.1,
        beta: float = 0.0,
        *,
        grad_mode: str = "relu",
        true_term: bool = True,
        confusing_term: bool = True,
        batched: bool = False,
        num_classes: int | None = None,
        input_size: Sequence[int] | None = None,
        every: int = 1,
    ):
        if alpha < 0 or beta < 0:
            raise ConfigError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}")
        if grad_mode not in ("relu", "abs"):
            raise ConfigError(f"grad mode must be relu or abs, got {grad_mode!r}")
        _refuse_unsupported(model)
        self.model = model
        self.diagnosis = diagnosis
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.grad_mode = grad_mode
        self.true_term = true_term
        self.confusing_term = confusing_term
        self.batched = batched
        self.every = every
        self._due: bool | None = None  # set by begin_step; None: never called
        self.layers: list[LayerRef] = resolve_layers(model, diagnosis.layer_names, input_size)
        diagnosis.check_compatible(model, self.layers, num_classes or diagnosis.num_classes)
        p = next(model.parameters())
        # relevant-channel masks as float [K, C] on the model's device
        dtype = torch.promote_types(p.dtype, torch.float32)
        self.masks = [diagnosis.layers[r.name].masks.to(p.device, dtype) for r in self.layers]
        if self.beta > 0 and not any(r.spatial for r in self.layers):
            warnings.warn(
                "beta > 0 but no target layer has a spatial map: no spatial loss", stacklevel=2
            )
        self.capture = FeatureCapture(model, self.layers)

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.beta > 0

    def remove(self) -> None:
        self.capture.remove()

    def is_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) carries the penalty: ``step % every == 0``."""
        return step % self.every == 0

    def begin_step(self, step: int) -> bool:
        """Declare the optimizer step the next forward pass belongs to; returns :meth:`is_due`.

        Call it before the forward of every micro-batch with the index of the optimizer step
        (not of the micro-batch), derived from a counter every rank shares and a checkpoint
        restores (e.g. the number of updates so far): all micro-batches of a step, all DDP ranks
        and a resumed run then make the same decision, without communication. On a step that is
        not due the feature hooks stay idle and :meth:`loss` returns zeros; on a due step it
        returns the terms with alpha and beta multiplied by ``every``.
        """
        self._due = self.is_due(int(step))
        self.capture.enabled = self._due
        return self._due

    def loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        fg_masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        grad_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Model Doctor loss for the last forward pass: ``(alpha*L_channel + beta*L_spatial, parts)``.

        ``fg_masks`` [B, 1, h, w] (1 = object) and ``has_mask`` [B] bool enable the spatial term.
        ``grad_scale`` is the fp16 loss scale: the cotangents are scaled before ``autograd.grad``
        and the gradients unscaled after, as in PyTorch's AMP gradient-penalty recipe.
        With ``every > 1`` the weights are ``every * alpha`` and ``every * beta`` on the steps
        :meth:`begin_step` found due, and the loss is zero on the others; ``parts`` are the
        unweighted terms either way.
        """
        # reduce in fp32 at least (bf16/fp16 features), in fp64 when the model is fp64
        self._acc_dtype = torch.promote_types(logits.dtype, torch.float32)
        zero = logits.new_zeros((), dtype=self._acc_dtype)
        parts = {"md_channel": zero.detach(), "md_spatial": zero.detach()}
        if self.every > 1:
            if self._due is None:
                raise ConfigError(
                    f"ModelDoctor(every={self.every}) needs the optimizer step: call "
                    "md.begin_step(step) before each forward pass"
                )
            if not self._due:
                self.capture.clear()
                return zero, parts
        alpha, beta = self.alpha * self.every, self.beta * self.every
        feats = self.capture.features()
        self.capture.clear()
        use_spatial = (
            self.beta > 0 and fg_masks is not None and has_mask is not None and bool(has_mask.any())
        )
        if not (self.alpha > 0 or use_spatial):
            return zero, parts
        b, k = logits.shape
        need_conf = self.alpha > 0 and self.confusing_term
        rows = [F.one_hot(targets, k)]
        if need_conf:
            t_conf = confusing_class(logits, targets)
            rows.append(F.one_hot(t_conf, k))
        cot = torch.stack(rows).to(logits.dtype) * grad_scale  # [R, B, K]
        if self.batched and len(rows) > 1:
            grads = torch.autograd.grad(
                logits, feats, cot, create_graph=True, is_grads_batched=True
            )
            g_true = [g[0] for g in grads]
            g_conf = [g[1] for g in grads]
        else:
            g_true = list(torch.autograd.grad(logits, feats, cot[0], create_graph=True))
            g_conf = (
                list(torch.autograd.grad(logits, feats, cot[1], create_graph=True))
                if need_conf
                else []
            )
        inv = 1.0 / grad_scale
        total = zero
        if self.alpha > 0:
            ch = zero
            for i, m in enumerate(self.masks):
                if self.true_term:
                    pos = self._reduce(g_true[i], inv)
                    ch = ch + (pos * (1.0 - m[targets])).sum(1).mean()
                if need_conf:
                    pos = self._reduce(g_conf[i], inv)
                    ch = ch + (pos * m[t_conf]).sum(1).mean()
            parts["md_channel"] = ch.detach()
            total = total + alpha * ch
        if use_spatial:
            sp = zero
            hm = has_mask.to(logits.device, self._acc_dtype)
            for g in g_true:
                if g.dim() != 4:
                    continue
                bg = 1.0 - resize_mask(fg_masks.to(g.device, self._acc_dtype), g.shape[-2:])
                per = (bg * g.to(self._acc_dtype).abs() * inv).flatten(1).sum(1)
                sp = sp + (per * hm).sum() / b
            parts["md_spatial"] = sp.detach()
            total = total + beta * sp
        return total, parts

    def _reduce(self, g: torch.Tensor, inv: float) -> torch.Tensor:
        g = g.to(self._acc_dtype) * inv
        g = g.clamp_min(0) if self.grad_mode == "relu" else g.abs()
        return g.flatten(2).sum(2) if g.dim() > 2 else g


def _refuse_unsupported(model: nn.Module) -> None:
    """Fail early on setups that silently break double backward (timm-accelerate-notes §5)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError("pass the unwrapped model to ModelDoctor (accelerator.unwrap_model)")
    if hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule":
        raise ConfigError(
            "torch.compile over the hooked region does not support double backward; "
            "compile only the layers below the target layer, or disable --torchcompile"
        )
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            raise ConfigError(
                f"SyncBatchNorm ({name}) has no double backward; Model Doctor cannot train through "
                "it (drop --sync-bn)"
            )


def check_wrapped_model(model: nn.Module) -> None:
    """Refuse a DDP wrapper with ``static_graph``: wrong gradients with create_graph=True."""
    if getattr(model, "static_graph", False):
        raise ConfigError(
            "DDP static_graph=True gives silently wrong gradients with Model Doctor's double "
            "backward; disable it"
        )
