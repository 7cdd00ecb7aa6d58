"""The forward half of one Model Doctor training step, shared by both training loops.

``ModelDoctorTask.forward`` (timm's ``task(input, target)`` loop) and the trainer's
``train_one_epoch`` (``train_md.py``) both call :func:`treatment_step`, so the step is written
once: whether the step is due (:meth:`ModelDoctor.begin_step`, lazy regularisation), the forward
pass, the criterion, and the penalties on each sample's dominant label
(:meth:`ModelDoctor.hard_targets`, :func:`~md_plugin.doctor.treatment.dominant_label`).

Why one function both call, and not the trainer running ``ModelDoctorTask``: the two loops own
different wrappers. The trainer's model is prepared by accelerate (its DDP wrapper, autocast,
gradient accumulation and GradScaler); the task owns timm's (``prepare_distributed`` builds its own
DDP wrapper, ``setup_ema``, ``compile``). Running the task inside the trainer would give the model
two owners of DDP and EMA. What they share is the forward half; the backward, gradient clipping,
skipping of non-finite steps and the update counter stay with each loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .treatment import ModelDoctor

__all__ = ["loss_scale", "treatment_step"]


def loss_scale(scaler: Any) -> float:
    """The current fp16 loss scale, at which the penalties' inner gradients must be taken.

    Args:
        scaler: a torch ``GradScaler``, timm's ``NativeScaler`` (which holds one), or None.

    Returns:
        The scale of an enabled scaler; 1.0 for None or a disabled one (bf16, fp32).
    """
    scaler = getattr(scaler, "_scaler", scaler)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    return float(scaler.get_scale())


def treatment_step(
    model: nn.Module,
    criterion: nn.Module | Callable,
    doctor: ModelDoctor | None,
    input: torch.Tensor,
    target: torch.Tensor,
    fg_masks: torch.Tensor | None = None,
    has_mask: torch.Tensor | None = None,
    *,
    step: int,
    loss_scaler: Any = None,
) -> dict[str, torch.Tensor]:
    """Forward, criterion and, on a due step, the Model Doctor penalties (no backward).

    The penalties are computed when the doctor has work (:attr:`ModelDoctor.computes`), the
    model is in training mode (or the doctor captures in eval mode) and optimizer step ``step``
    is due (``step % every == 0``); the loss scale is read only then (a host sync on a GPU).
    Call it under the loop's autocast.

    Args:
        model: the model as the loop runs it (a DDP wrapper is fine; the doctor's hooks sit on
            the unwrapped modules).
        criterion: the classification loss, ``criterion(output, target)``.
        doctor: the :class:`ModelDoctor` attached to the model, or None for a plain step.
        input: the batch [B, ...].
        target: class indices [B] or soft (mixup/cutmix) targets [B, K]; the criterion gets them
            as they are, the penalties each sample's dominant label.
        fg_masks: [B, 1, h, w] foreground masks for the spatial term, or None.
        has_mask: [B] bool, which samples have a mask, or None.
        step: index of the optimizer step this forward belongs to (all micro-batches of one
            step share it), from a counter every rank shares and a resume restores.
        loss_scaler: the fp16 loss scaler (see :func:`loss_scale`), or None.

    Returns:
        ``loss`` (criterion + penalties, differentiable), ``output`` (logits), ``task_loss``
        (the criterion, detached) and, on a step that computed the penalties, their detached
        parts (``md_channel``, ``md_spatial`` and the ``md_irr_*`` statistics).
    """
    due = (
        doctor is not None
        and doctor.computes
        and (model.training or doctor.capture_eval)
        and doctor.begin_step(step)
    )
    output = model(input)
    task_loss = criterion(output, target)
    result = {"loss": task_loss, "output": output, "task_loss": task_loss.detach()}
    if due:
        md_loss, parts = doctor.loss(
            output, target, fg_masks, has_mask, grad_scale=loss_scale(loss_scaler)
        )
        result["loss"] = task_loss + md_loss
        result.update(parts)
    return result
