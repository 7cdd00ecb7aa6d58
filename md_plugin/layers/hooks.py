"""Capture target-layer outputs during the ordinary forward pass.

Design choices, each from a measured trap (docs in timm-accelerate-notes §3, §5):
- The hook replaces the module output with a clone and keeps the original. Downstream in-place
  ops (ReLU(inplace), ``x += shortcut``) then modify the clone, so the captured tensor is never
  rebased and its gradient is the gradient of the pre-activation output.
- Only the first call per forward is kept: with gradient checkpointing leaf hooks fire again
  during recomputation. A forward pre-hook on the root model clears the slots.
- Features live on this object, never in the model's return value, so DDP's output wrapping
  cannot detach them from the graph.
- ``graph_from_first=True`` (diagnosis): run the forward under ``torch.no_grad()``; the first
  target layer's output becomes a new leaf and recording starts there, so nothing below the
  targets is kept for backward (no parameter gradients are needed to diagnose).
- ``train_only=True`` (treatment): nothing is captured while the model (the root module) is in
  eval mode (no clone, nothing kept), so evaluation does not pay for the hooks.
- The hooks are closures, not bound methods: ``copy.deepcopy(model)`` (timm's ModelEmaV3) then
  copies no capture state; :meth:`FeatureCapture.strip` removes them from such a copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .select import LayerRef

__all__ = ["FeatureCapture"]


class FeatureCapture:
    """Forward hooks that record each target layer's output for the current forward pass."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerRef],
        clone: bool = True,
        graph_from_first: bool = False,
        train_only: bool = False,
    ):
        if os.environ.get("TIMM_REENTRANT_CKPT", "0") not in ("", "0"):
            raise ConfigError(
                "TIMM_REENTRANT_CKPT=1 (reentrant gradient checkpointing) breaks the double "
                "backward Model Doctor needs; unset it"
            )
        self.model = model
        self.layers = list(layers)
        self.clone = clone
        self.graph_from_first = graph_from_first
        self.train_only = train_only
        self.enabled = True
        self._features: dict[str, torch.Tensor] = {}
        self._skipped_eval = False
        self._active = True

        def reset(mod, _inp) -> None:
            self._features = {}
            self._skipped_eval = False
            self._active = mod.training or not self.train_only

        self._handles = [model.register_forward_pre_hook(reset)]
        for ref in self.layers:
            self._handles.append(ref.module.register_forward_hook(self._make_hook(ref.name)))

    def _make_hook(self, name: str):
        def hook(mod, _inp, out):
            if not self.enabled or name in self._features or not isinstance(out, torch.Tensor):
                return None
            if not self._active:
                self._skipped_eval = True
                return None
            if self.graph_from_first and not torch.is_grad_enabled():
                # the first target of a no_grad forward: start the graph here (restored to
                # no_grad when the caller's context exits)
                torch.set_grad_enabled(True)
                out = out.detach().requires_grad_(True)
            self._features[name] = out
            return out.clone() if self.clone else None

        return hook

    def features(self) -> list[torch.Tensor]:
        """The captured outputs, in layer order; raises if a layer did not run."""
        missing = [ref.name for ref in self.layers if ref.name not in self._features]
        if missing and self._skipped_eval:
            raise RuntimeError(
                f"target layer(s) {missing} were not captured: the model ran in eval mode and "
                "Model Doctor captures only in training mode (call model.train(), or pass "
                "capture_eval=True)"
            )
        if missing:
            raise RuntimeError(
                f"target layer(s) {missing} did not run in the last forward pass (hooks on "
                "containers under gradient checkpointing never fire; target leaf modules)"
            )
        return [self._features[ref.name] for ref in self.layers]

    def clear(self) -> None:
        self._features = {}

    def strip(self, copy: nn.Module) -> None:
        """Remove these hooks from a deep copy of the model (e.g. an EMA model)."""
        ids = {h.id for h in self._handles}
        for m in copy.modules():
            for hooks in (m._forward_hooks, m._forward_pre_hooks):
                for i in ids & set(hooks):
                    del hooks[i]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._features = {}

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
