"""Model Doctor as a ``timm.task`` training task.

timm's ``train.py`` runs every step as ``result = task(input, target)`` and backpropagates
``result['loss']``; :class:`ModelDoctorTask` is timm's ``ClassificationTask`` with the Model
Doctor penalties added to that loss, so enabling Model Doctor in a timm task loop is one
changed constructor::

    task = ModelDoctorTask(model=model, diagnosis="diagnosis.safetensors", alpha=0.078,
                           criterion=train_loss_fn, device=device, dtype=model_dtype)

The result holds ``loss`` (criterion + penalties), ``output`` (logits), ``task_loss`` (the
criterion alone, detached) and ``md_channel`` / ``md_spatial`` (detached parts), as timm's
distillation tasks report their parts. The step is :func:`md_plugin.doctor.step.treatment_step`,
the one ``train_md.py`` runs, so ``every`` (lazy regularisation), ``loss_kind`` and ``monitor``
act here exactly as ``--md-every``, ``--md-loss`` and ``--md-monitor`` do there. EMA, checkpoint and distributed helpers are timm's; this
class only keeps the doctor's hooks out of the EMA copy, refuses the wrappers that break double
backward (``torch.compile`` over the model, DDP ``static_graph``) and saves which diagnosis a
checkpoint was treated with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.task import ClassificationTask

from .doctor.diagnosis import Diagnosis
from .doctor.step import treatment_step
from .doctor.treatment import ModelDoctor
from .errors import ConfigError, MDError

__all__ = ["ModelDoctorTask"]


class ModelDoctorTask(ClassificationTask):
    """timm ``ClassificationTask`` whose loss adds Model Doctor's gradient penalties.

    Each training forward is the step :func:`~md_plugin.doctor.step.treatment_step` that
    ``train_md.py`` runs too, lazy regularisation (``every``) included: the step index comes
    from ``forward(..., step=)`` when the loop passes its update counter (needed with gradient
    accumulation or skipped steps), else from the task's own count of training forwards
    (:attr:`steps`, one optimizer step each, as in timm's loop without accumulation), which the
    checkpoint's task state carries across a resume.

    Args:
        model: the model to treat (unwrapped; :meth:`prepare_distributed` wraps it).
        diagnosis: a :class:`~md_plugin.Diagnosis` or the path of a saved one.
        criterion: the classification loss, as in ``ClassificationTask`` (soft/mixup targets
            work: the penalties use each sample's dominant label).
        criterion_kwargs: as in ``ClassificationTask``.
        alpha: channel-term weight (finite, >= 0).
        beta: spatial-term weight (finite, >= 0).
        grad_mode: ``relu`` or ``abs``.
        true_term: keep the official loss's true-class term.
        confusing_term: keep the official loss's confusing-class term.
        loss_kind: ``official``, ``true_only`` or ``share``.
        monitor: compute the terms (reported in the result) even when they do not train.
        every: the terms on every ``every``-th optimizer step, with ``every`` times the weight.
        num_classes: the model's number of classes (default: the diagnosis').
        input_size: (C, H, W) to trace the target layers at.
        capture_eval: compute the terms in eval mode too.
        loss_scaler: timm's ``NativeScaler`` (or a torch ``GradScaler``) under fp16, so the
            inner gradients are taken at the loss scale (PyTorch's gradient-penalty recipe).
        device: as in ``ClassificationTask``.
        dtype: as in ``ClassificationTask``.
        verbose: as in ``ClassificationTask``.
    """

    def __init__(
        self,
        model: nn.Module,
        diagnosis: Diagnosis | str | os.PathLike,
        criterion: nn.Module | Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        *,
        alpha: float = 0.1,
        beta: float = 0.0,
        grad_mode: str = "relu",
        true_term: bool = True,
        confusing_term: bool = True,
        loss_kind: str = "official",
        monitor: bool = False,
        every: int = 1,
        num_classes: int | None = None,
        input_size: Sequence[int] | None = None,
        capture_eval: bool = False,
        loss_scaler: Any = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ):
        if isinstance(diagnosis, (str, Path, os.PathLike)):
            diagnosis = Diagnosis.load(diagnosis)
        super().__init__(
            model,
            criterion,
            criterion_kwargs=criterion_kwargs,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
        # not an nn.Module: its reference to the model registers no second copy of the weights
        self.doctor = ModelDoctor(
            model,
            diagnosis,
            alpha=alpha,
            beta=beta,
            grad_mode=grad_mode,
            true_term=true_term,
            confusing_term=confusing_term,
            loss_kind=loss_kind,
            monitor=monitor,
            every=every,
            num_classes=num_classes,
            input_size=input_size,
            capture_eval=capture_eval,
        )
        self.loss_scaler = loss_scaler
        self.steps = 0  # training forwards given no step= (the optimizer steps of timm's loop)

    # -- wrappers ------------------------------------------------------------------------------
    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> ModelDoctorTask:
        """Wrap the model in DDP (hooks stay on the unwrapped modules); ``static_graph`` gives
        silently wrong gradients with double backward and is refused.

        Args:
            device_ids: as in timm (e.g. ``[local_rank]``).
            **ddp_kwargs: passed to ``DistributedDataParallel``.

        Returns:
            self.
        """
        if ddp_kwargs.get("static_graph"):
            raise ConfigError(
                "DDP static_graph=True gives silently wrong gradients with Model Doctor's double "
                "backward; disable it"
            )
        return super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs):
        """timm's ``compile``, refused while the penalties train (no double backward through a
        compiled model).

        Args:
            backend: ``torch.compile`` backend.
            mode: ``torch.compile`` mode.
            **compile_kwargs: passed to ``torch.compile``.

        Returns:
            The compiled module (timm's).
        """
        if self.doctor.active:
            raise ConfigError(
                "torch.compile over the hooked model does not support Model Doctor's double "
                "backward; train without --torchcompile"
            )
        return super().compile(backend=backend, mode=mode, **compile_kwargs)

    def setup_ema(self, *args, **kwargs) -> nn.Module:
        """timm's ModelEmaV3, without the doctor's hooks on the copy.

        Args:
            *args: passed to timm's ``setup_ema``.
            **kwargs: passed to timm's ``setup_ema``.

        Returns:
            The EMA module (timm's).
        """
        ema = super().setup_ema(*args, **kwargs)
        self.doctor.strip(getattr(ema, "module", ema))
        return ema

    # -- checkpoint state ----------------------------------------------------------------------
    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """The diagnosis the weights were treated with, and the step count.

        Args:
            module: unused (timm's signature).
            ema: the EMA copy's state, which has none.

        Returns:
            ``md_layers``, ``md_masks`` (uint8), ``md_alpha``, ``md_beta`` and ``md_steps``
            (:attr:`steps`, so lazy regularisation keeps its phase across a resume).
        """
        if ema:
            return {}
        d = self.doctor.diagnosis
        return {
            "md_layers": list(d.layer_names),
            "md_masks": [d.layers[n].masks.to(torch.uint8).cpu() for n in d.layer_names],
            "md_alpha": self.doctor.alpha,
            "md_beta": self.doctor.beta,
            "md_steps": self.steps,
        }

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        """Restore the step count; with ``strict``, refuse a checkpoint treated with another
        diagnosis.

        Args:
            state: what :meth:`get_task_state` saved (None or empty: nothing to restore).
            strict: compare the saved diagnosis (layers and masks) with this task's.
            module: unused (timm's signature).
            ema: the EMA copy's state, which has none.

        Raises:
            MDError: ``strict`` and the checkpoint was treated with another diagnosis.
        """
        if ema or not state:
            return
        self.steps = int(state.get("md_steps", self.steps))
        if "md_layers" not in state or not strict:
            return
        d = self.doctor.diagnosis
        same = state["md_layers"] == d.layer_names and all(
            torch.equal(m.bool(), d.layers[n].masks.cpu())
            for n, m in zip(state["md_layers"], state["md_masks"])
        )
        if not same:
            raise MDError(
                f"checkpoint was treated with another diagnosis (layers {state['md_layers']}); "
                "pass the same diagnosis file, or load with strict=False"
            )

    # -- the step ------------------------------------------------------------------------------
    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        fg_masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        *,
        step: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward, criterion and (in training mode, on a due step) the Model Doctor penalties.

        Args:
            input: the batch [B, C, H, W].
            target: class indices [B] or soft targets [B, K].
            fg_masks: [B, 1, h, w] foreground masks for the spatial term (see
                :meth:`ModelDoctor.loss`), or None.
            has_mask: [B] bool, which samples have a mask, or None.
            step: the optimizer-step index this forward belongs to (all micro-batches of a step
                share it); None counts training forwards instead (:attr:`steps`).

        Returns:
            ``loss`` (criterion + penalties), ``output`` (logits), ``task_loss`` (the criterion,
            detached) and, on a step that computed them, the detached ``md_*`` parts.
        """
        if step is None:
            step = self.steps
            if self.trainable_module.training:
                self.steps += 1
        return treatment_step(
            self.trainable_module, self.criterion, self.doctor, input, target, fg_masks,
            has_mask, step=step, loss_scaler=self.loss_scaler,
        )  # fmt: skip
