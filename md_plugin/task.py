"""Model Doctor as a ``timm.task`` training task.

timm's ``train.py`` runs every step as ``result = task(input, target)`` and backpropagates
``result['loss']``; :class:`ModelDoctorTask` is timm's ``ClassificationTask`` with the Model
Doctor penalties added to that loss, so enabling Model Doctor in a timm task loop is one
changed constructor::

    task = ModelDoctorTask(model=model, diagnosis="diagnosis.safetensors", alpha=0.078,
                           criterion=train_loss_fn, device=device, dtype=model_dtype)

The result holds ``loss`` (criterion + penalties), ``output`` (logits), ``task_loss`` (the
criterion alone, detached) and ``md_channel`` / ``md_spatial`` (detached parts), as timm's
distillation tasks report their parts. EMA, checkpoint and distributed helpers are timm's; this
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
from .errors import ConfigError, MDError
from .losses.treatment import ModelDoctor

__all__ = ["ModelDoctorTask"]


class ModelDoctorTask(ClassificationTask):
    """timm ``ClassificationTask`` whose loss adds Model Doctor's gradient penalties.

    Args:
        model: the model to treat (unwrapped; :meth:`prepare_distributed` wraps it).
        diagnosis: a :class:`~md_plugin.Diagnosis` or the path of a saved one.
        criterion, criterion_kwargs: as in ``ClassificationTask`` (soft/mixup targets work: the
            penalties use each sample's dominant label).
        alpha, beta, grad_mode, true_term, confusing_term, num_classes, input_size,
            capture_eval: passed to :class:`~md_plugin.ModelDoctor`.
        loss_scaler: timm's ``NativeScaler`` (or a torch ``GradScaler``) under fp16, so the
            inner gradients are taken at the loss scale (PyTorch's gradient-penalty recipe).
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
            num_classes=num_classes,
            input_size=input_size,
            capture_eval=capture_eval,
        )
        self.loss_scaler = loss_scaler

    # -- wrappers ------------------------------------------------------------------------------
    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> ModelDoctorTask:
        """Wrap the model in DDP (hooks stay on the unwrapped modules); ``static_graph`` gives
        silently wrong gradients with double backward and is refused."""
        if ddp_kwargs.get("static_graph"):
            raise ConfigError(
                "DDP static_graph=True gives silently wrong gradients with Model Doctor's double "
                "backward; disable it"
            )
        return super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs):
        if self.doctor.active:
            raise ConfigError(
                "torch.compile over the hooked model does not support Model Doctor's double "
                "backward; train without --torchcompile"
            )
        return super().compile(backend=backend, mode=mode, **compile_kwargs)

    def setup_ema(self, *args, **kwargs) -> nn.Module:
        """timm's ModelEmaV3, without the doctor's hooks on the copy."""
        ema = super().setup_ema(*args, **kwargs)
        self.doctor.strip(getattr(ema, "module", ema))
        return ema

    # -- checkpoint state ----------------------------------------------------------------------
    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """The diagnosis the weights were treated with (layer names and masks)."""
        if ema:
            return {}
        d = self.doctor.diagnosis
        return {
            "md_layers": list(d.layer_names),
            "md_masks": [d.layers[n].masks.to(torch.uint8).cpu() for n in d.layer_names],
            "md_alpha": self.doctor.alpha,
            "md_beta": self.doctor.beta,
        }

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        """With ``strict``, refuse a checkpoint treated with another diagnosis."""
        if ema or not state or "md_layers" not in state or not strict:
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
    def _grad_scale(self) -> float:
        scaler = getattr(self.loss_scaler, "_scaler", self.loss_scaler)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return 1.0
        return float(scaler.get_scale())

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        fg_masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward, criterion, and (in training mode) the Model Doctor penalties.

        ``target`` is class indices [B] or soft targets [B, K]. ``fg_masks``/``has_mask``
        enable the spatial term (see :meth:`ModelDoctor.loss`).
        """
        output = self.trainable_module(input)
        task_loss = self.criterion(output, target)
        result = {"loss": task_loss, "output": output, "task_loss": task_loss.detach()}
        if self.doctor.computes and (self.trainable_module.training or self.doctor.capture_eval):
            md_loss, parts = self.doctor.loss(
                output, target, fg_masks, has_mask, grad_scale=self._grad_scale()
            )
            result["loss"] = task_loss + md_loss
            result.update(parts)
        return result
