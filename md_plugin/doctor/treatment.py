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

Channel-loss variants (``loss_kind``; ``official`` is the default and is the formula above):

- ``true_only``: the true-class term alone (same as ``confusing_term=False``).
- ``share``: the irrelevant *share* of each sample's positive true-class gradient mass,

      channel_b = sum_c relu(G(y_b))_b[c] (1 - M[y_b, c]) / sum_c relu(G(y_b))_b[c]

  (0 for a sample whose true-class gradient has no positive part). It is invariant to the scale
  of the gradient, so it cannot be met by shrinking every gradient, which is how the official
  penalty is mostly met (docs/results.md). Not in the paper or the official code. Its value lies
  in [0, 1], so its alpha is not comparable with the official one.

Whatever the variant, ``parts`` also reports the true-class irrelevant mass (``md_irr_mass``,
the ``true_only`` term) and share (``md_irr_share``, the ``share`` term) whenever the true-class
gradient is computed, so every arm of an experiment logs the same statistics. ``monitor=True``
with alpha = 0 (and no spatial term) computes all of them without building a double-backward
graph and adds nothing to the loss: what the penalty would have been, for a control run.

Layers whose output is NHWC (convnext ``mlp.fc2``/``norm``, swin) or ``[B, N, C]`` tokens (ViT,
DeiT) are reduced over their real channel axis (:class:`~md_plugin.layers.LayerRef`); tokens are
the spatial positions, and the spatial term uses the patch tokens on their grid (class/register
tokens have no position and no background).

Soft targets ([B, K] rows from mixup/cutmix, label smoothing or BCE targets): both terms use each
sample's *dominant* label, the argmax of its row (under mixup/cutmix the class of the image that
covers more of the mix; an exact 50/50 tie goes to the lower class index). The confusing class is
then chosen against that label as above.

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

import logging
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..layers import FeatureCapture, LayerRef, resolve_layers
from .diagnosis import Diagnosis

__all__ = [
    "MD_LOSSES",
    "ModelDoctor",
    "check_wrapped_model",
    "confusing_class",
    "dominant_label",
    "irrelevant_share",
    "resize_mask",
]

_logger = logging.getLogger(__name__)

MD_LOSSES = ("official", "true_only", "share")


def dominant_label(targets: torch.Tensor) -> torch.Tensor:
    """Each sample's class for the penalties: the label itself, or the argmax of a soft row.

    The one definition of the dominant label (the trainer, ``ModelDoctorTask`` and
    :meth:`ModelDoctor.hard_targets` all come here). Under mixup/cutmix it is the class of the
    image that covers more of the mix; an exact 50/50 tie goes to the lower class index.

    Args:
        targets: class indices [B] or soft targets [B, K].

    Returns:
        Class indices [B] (the input itself when it already is).
    """
    return targets.argmax(-1) if targets.dim() == 2 else targets


def confusing_class(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """2nd-ranked class where the top-1 is right, else the (wrong) top-1."""
    top2 = logits.detach().topk(2, dim=1).indices
    return torch.where(top2[:, 0] == targets, top2[:, 1], top2[:, 0])


def irrelevant_share(pos: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
    """Per-sample share [B] of positive gradient mass ``pos`` [B, C] on channels ``irrelevant``.

    A sample with no positive mass has share 0 (and a zero gradient), not 0/0.
    """
    total = pos.sum(1)
    irr = (pos * irrelevant).sum(1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, irr / safe, torch.zeros_like(irr))


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, 1, h, w] foreground mask -> [B, 1, H, W] foreground fraction (area interpolation)."""
    mask = mask if mask.is_floating_point() else mask.float()
    return F.interpolate(mask, size=tuple(size), mode="area")


class ModelDoctor:
    """Channel (and spatial) gradient penalties for the layers of a :class:`Diagnosis`.

    The target layers are the diagnosis's, traced at ``input_size``; when it is not given, at the
    size recorded in the diagnosis, and again at the first training batch's size if that differs
    (without either, the layers are bound at the first forward pass). Hooks capture only while
    the model is in training mode, so evaluation does not pay for them (``capture_eval=True``
    captures in eval mode too). timm's fused attention, which has no double backward, is switched
    off while the doctor is attached (one log line) and restored by :meth:`remove`.

    Args:
        model: the model to treat, unwrapped (not DDP, not compiled); forward hooks are added to
            its target layers.
        diagnosis: the :class:`Diagnosis` whose layers and relevant-channel masks are used.
        alpha: weight of the channel term (finite, >= 0; 0 with ``monitor`` only measures it).
        beta: weight of the spatial term (finite, >= 0); needs foreground masks in :meth:`loss`.
        grad_mode: ``relu`` (official: positive gradient part) or ``abs``.
        true_term: keep the true-class term of the official loss.
        confusing_term: keep the confusing-class term of the official loss.
        batched: both class terms from one vmapped gradient call (slower on CPU).
        num_classes: the model's number of classes (default: the diagnosis').
        input_size: (C, H, W) to trace the target layers at (default: see above).
        loss_kind: ``official``, ``true_only`` or ``share`` (module docstring).
        monitor: compute the terms (``parts``) even when they do not train.
        every: lazy regularisation, the terms on every ``every``-th optimizer step with ``every``
            times the weight (:meth:`begin_step`).
        capture_eval: capture features in eval mode too.
    """

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
        loss_kind: str = "official",
        monitor: bool = False,
        every: int = 1,
        capture_eval: bool = False,
    ):
        if not (_finite_weight(alpha) and _finite_weight(beta)):
            raise ConfigError(
                f"alpha and beta must be finite numbers >= 0, got alpha={alpha!r}, beta={beta!r}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}")
        if grad_mode not in ("relu", "abs"):
            raise ConfigError(f"grad mode must be relu or abs, got {grad_mode!r}")
        if loss_kind not in MD_LOSSES:
            raise ConfigError(f"Model Doctor loss must be one of {MD_LOSSES}, got {loss_kind!r}")
        if loss_kind != "official" and not true_term:
            raise ConfigError(f"the {loss_kind!r} loss is the true-class term: it cannot be off")
        if loss_kind != "official":
            confusing_term = False
        _refuse_unsupported(model)
        self.model = model
        self.diagnosis = diagnosis
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.grad_mode = grad_mode
        self.true_term = true_term
        self.confusing_term = confusing_term
        self.batched = batched
        self.loss_kind = loss_kind
        self.monitor = bool(monitor)
        self.every = every
        self._due: bool | None = None  # set by begin_step; None: never called
        self.num_classes = num_classes or diagnosis.num_classes
        self.capture_eval = capture_eval
        self.layers: list[LayerRef] = []
        self.masks: list[torch.Tensor] = []
        self.capture: FeatureCapture | None = None
        self._size: tuple[int, ...] | None = None
        self._first: torch.utils.hooks.RemovableHandle | None = None
        self._attn_restore: list[nn.Module] = []
        recorded = diagnosis.options.get("input_size")
        size = input_size if input_size is not None else recorded
        if size is not None:
            self._bind(tuple(size))
        if input_size is None:  # (re)bind at the size the training data has

            def first(mod: nn.Module, args: tuple) -> None:  # a closure: deepcopy-safe
                self._bind_first(mod, args)

            self._first = model.register_forward_pre_hook(first)
        if self.active:
            self._disable_fused_attention()

    # -- binding the target layers ------------------------------------------------------------
    def _bind(self, size: tuple[int, ...]) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        self.layers = resolve_layers(self.model, self.diagnosis.layer_names, size)
        self.diagnosis.check_compatible(self.model, self.layers, self.num_classes)
        p = next(self.model.parameters())
        # relevant-channel masks as float [K, C] on the model's device
        dtype = torch.promote_types(p.dtype, torch.float32)
        self.masks = [self.diagnosis.layers[r.name].masks.to(p.device, dtype) for r in self.layers]
        if self.beta > 0 and not any(r.spatial for r in self.layers):
            warnings.warn(
                "beta > 0 but no target layer has a spatial map: no spatial loss", stacklevel=3
            )
        self.capture = FeatureCapture(self.model, self.layers, train_only=not self.capture_eval)
        self.capture.enabled = self._due is not False  # every > 1: idle on steps not due
        self._size = size

    def _bind_first(self, _mod: nn.Module, args: tuple) -> None:
        """One-shot forward pre-hook: trace at the first batch's size if it differs."""
        if not self.model.training and self.capture is not None:
            return  # an evaluation pass before training: wait for a training batch
        if self._first is not None:
            self._first.remove()
            self._first = None
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and tuple(x.shape[1:]) != self._size:
            self._bind(tuple(x.shape[1:]))

    def _disable_fused_attention(self) -> None:
        """Fused scaled-dot-product attention has no double backward (CPU flash kernel: "derivative
        for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so
        timm's attention modules use their explicit softmax path while the doctor is attached."""
        mods = [m for m in self.model.modules() if getattr(m, "fused_attn", False) is True]
        for m in mods:
            m.fused_attn = False
        if mods:
            _logger.info(
                "Model Doctor: switched timm's fused attention off in %d module(s) (no double "
                "backward through scaled_dot_product_attention)",
                len(mods),
            )
        self._attn_restore = mods

    @property
    def active(self) -> bool:
        """True when the loss trains the model (alpha or beta > 0)."""
        return self.alpha > 0 or self.beta > 0

    @property
    def computes(self) -> bool:
        """True when :meth:`loss` has work to do: training, or monitoring the channel term."""
        return self.active or self.monitor

    def strip(self, copy: nn.Module) -> None:
        """Remove this doctor's hooks from a deep copy of the model (e.g. an EMA model)."""
        if self.capture is not None:
            self.capture.strip(copy)
        if self._first is not None:
            for m in copy.modules():
                m._forward_pre_hooks.pop(self._first.id, None)

    def remove(self) -> None:
        """Remove the hooks and restore fused attention."""
        if self.capture is not None:
            self.capture.remove()
        if self._first is not None:
            self._first.remove()
            self._first = None
        for m in self._attn_restore:
            m.fused_attn = True
        self._attn_restore = []

    def hard_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Checked class indices for the penalties: the labels, or each soft row's dominant label.

        Args:
            logits: the model's output [B, K] (fixes B and K).
            targets: class indices [B] (integers in [0, K)) or soft targets [B, K].

        Returns:
            Class indices [B] (:func:`dominant_label` of soft targets).

        Raises:
            ConfigError: another shape, float or bool class indices, or a label out of range.
        """
        b, k = logits.shape
        if targets.dim() == 2:
            if tuple(targets.shape) != (b, k):
                raise ConfigError(
                    f"soft targets must be [batch, classes] = {[b, k]} like the logits, "
                    f"got {list(targets.shape)}"
                )
            return dominant_label(targets)
        if targets.dim() != 1 or targets.shape[0] != b:
            raise ConfigError(
                f"targets must be class indices [{b}] or soft targets [{b}, {k}], "
                f"got shape {list(targets.shape)}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ConfigError(f"class-index targets must be integers, got {targets.dtype}")
        # one host read per call (a sync on a GPU), not two: min and max reduced together
        if b and bool(((targets < 0) | (targets >= k)).any()):
            raise ConfigError(
                f"target labels must be in [0, {k - 1}] for {k} logits, got "
                f"[{int(targets.min())}, {int(targets.max())}]"
            )
        return targets

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

        Args:
            step: the 0-based optimizer-step index.

        Returns:
            Whether this step carries the penalty (``step % every == 0``).
        """
        self._due = self.is_due(int(step))
        if self.capture is not None:
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

        With ``every > 1`` the weights are ``every * alpha`` and ``every * beta`` on the steps
        :meth:`begin_step` found due, and the loss is zero on the others.

        Args:
            logits: the model's output [B, K] for the forward pass the hooks captured.
            targets: class indices [B] or soft targets [B, K] (each sample's dominant label is
                used, see the module docstring).
            fg_masks: [B, 1, h, w] foreground masks (1 = object); with ``has_mask`` they enable
                the spatial term.
            has_mask: [B] bool, the samples that have a mask.
            grad_scale: the fp16 loss scale: the cotangents are scaled before ``autograd.grad``
                and the gradients unscaled after, as in PyTorch's AMP gradient-penalty recipe.

        Returns:
            The weighted penalty (differentiable when it trains, a detached zero otherwise) and
            ``parts``: the unweighted detached terms ``md_channel``, ``md_spatial`` and, when the
            true-class gradient was computed, ``md_irr_mass`` and ``md_irr_share``.
        """
        # reduce in fp32 at least (bf16/fp16 features), in fp64 when the model is fp64
        self._acc_dtype = torch.promote_types(logits.dtype, torch.float32)
        zero = logits.new_zeros((), dtype=self._acc_dtype)
        parts = {"md_channel": zero.detach(), "md_spatial": zero.detach()}
        if self.capture is None:
            raise RuntimeError("ModelDoctor.loss called before any forward pass of the model")
        targets = self.hard_targets(logits, targets)
        if self.masks and self.masks[0].device != logits.device:  # the model moved since
            self.masks = [m.to(logits.device) for m in self.masks]
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
        train_channel = self.alpha > 0
        channel = train_channel or self.monitor  # monitor: the value, without training on it
        if not (channel or use_spatial):
            return zero, parts
        g_true, g_conf, t_conf = self._class_grads(
            logits, feats, targets, grad_scale,
            need_true=self.true_term or use_spatial or self.monitor,
            need_conf=channel and self.confusing_term,
            graph=train_channel or use_spatial,  # double backward only when the loss trains
        )  # fmt: skip
        inv = 1.0 / grad_scale
        total = zero
        if channel:
            with torch.set_grad_enabled(train_channel and torch.is_grad_enabled()):
                ch, irr_mass, irr_share = self._channel_terms(
                    g_true, g_conf, targets, t_conf, inv, zero
                )
            parts["md_channel"] = ch.detach()
            if g_true:
                parts["md_irr_mass"] = irr_mass.detach()
                parts["md_irr_share"] = irr_share.detach() / len(self.masks)
            if train_channel:
                total = total + alpha * ch
        if use_spatial:
            sp = self._spatial_term(g_true, fg_masks, has_mask, inv, zero, logits.shape[0])
            parts["md_spatial"] = sp.detach()
            total = total + beta * sp
        return total, parts

    def _class_grads(
        self,
        logits: torch.Tensor,
        feats: list[torch.Tensor],
        targets: torch.Tensor,
        grad_scale: float,
        *,
        need_true: bool,
        need_conf: bool,
        graph: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """G(y) and G(t') at every target layer, and t' itself.

        One ``autograd.grad`` call per class term for all layers (or one vmapped call for both,
        ``batched``), with the cotangents at the fp16 loss scale.
        """
        k = logits.shape[1]
        rows, keys = [], []
        t_conf = None
        if need_true:
            rows.append(F.one_hot(targets, k))
            keys.append("true")
        if need_conf:
            t_conf = confusing_class(logits, targets)
            rows.append(F.one_hot(t_conf, k))
            keys.append("conf")
        cot = torch.stack(rows).to(logits.dtype) * grad_scale  # [R, B, K]
        kw = dict(create_graph=graph, retain_graph=True)
        if self.batched and len(rows) > 1:
            grads = torch.autograd.grad(logits, feats, cot, is_grads_batched=True, **kw)
            per = {key: [g[i] for g in grads] for i, key in enumerate(keys)}
        else:
            per = {
                key: list(torch.autograd.grad(logits, feats, cot[i], **kw))
                for i, key in enumerate(keys)
            }
        return per.get("true", []), per.get("conf", []), t_conf

    def _channel_terms(
        self,
        g_true: list[torch.Tensor],
        g_conf: list[torch.Tensor],
        targets: torch.Tensor,
        t_conf: torch.Tensor | None,
        inv: float,
        zero: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The channel term of ``loss_kind``, summed over layers, and the true-class irrelevant
        mass and share (summed over layers) that every arm logs."""
        ch, irr_mass, irr_share = zero, zero, zero
        for i, m in enumerate(self.masks):
            if g_true:
                pos = self._reduce(self.layers[i].channels_first(g_true[i]), inv)
                irrelevant = 1.0 - m[targets]
                mass = (pos * irrelevant).sum(1).mean()
                share = irrelevant_share(pos, irrelevant).mean()
                irr_mass, irr_share = irr_mass + mass, irr_share + share
                if self.loss_kind == "share":
                    ch = ch + share
                elif self.true_term:
                    ch = ch + mass
            if g_conf:
                pos = self._reduce(self.layers[i].channels_first(g_conf[i]), inv)
                ch = ch + (pos * m[t_conf]).sum(1).mean()
        return ch, irr_mass, irr_share

    def _spatial_term(
        self,
        g_true: list[torch.Tensor],
        fg_masks: torch.Tensor,
        has_mask: torch.Tensor,
        inv: float,
        zero: torch.Tensor,
        b: int,
    ) -> torch.Tensor:
        """Background gradient mass of the annotated samples, summed over layers, per image."""
        sp = zero
        hm = has_mask.to(zero.device, self._acc_dtype)
        for ref, g in zip(self.layers, g_true):
            g = ref.spatial_map(g)
            if g is None:
                continue
            bg = 1.0 - resize_mask(fg_masks.to(g.device, self._acc_dtype), g.shape[-2:])
            per_s = (bg * g.to(self._acc_dtype).abs() * inv).flatten(1).sum(1)
            sp = sp + (per_s * hm).sum() / b
        return sp

    def _reduce(self, g: torch.Tensor, inv: float) -> torch.Tensor:
        g = g.to(self._acc_dtype) * inv
        g = g.clamp_min(0) if self.grad_mode == "relu" else g.abs()
        return g.flatten(2).sum(2) if g.dim() > 2 else g


def _finite_weight(w: object) -> bool:
    """A loss weight is a finite number >= 0 (NaN fails every comparison, so ``w < 0`` alone
    lets NaN through; inf would turn every penalised step into inf or NaN). A string is refused
    rather than parsed: the weights come from code or from flags already typed."""
    if isinstance(w, (str, bytes)):
        return False
    try:
        return 0 <= float(w) < math.inf
    except (TypeError, ValueError):
        return False


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
