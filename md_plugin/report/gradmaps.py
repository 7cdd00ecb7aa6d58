"""Spatial maps of where a layer's true-class gradient points, for before/after overlays.

The diagnosis summarises gradients per channel; these maps keep the spatial layout instead
(positive part, summed over channels), showing *where* in the image the class evidence sits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["spatial_gradient_maps"]


def _model_device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def spatial_gradient_maps(
    model: nn.Module,
    module: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | Sequence[int],
    normalize: str = "max",
    to_map: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> np.ndarray:
    """Per-sample map [N, H, W] of the target logit's positive gradient at ``module``.

    ``images`` is the model's input batch [N, C, H, W] (already normalised as the model
    expects); ``targets`` holds one class index per sample. The map is
    ``sum_k relu(d logit_target / d feature[k])`` over the channels k of ``module``'s output,
    divided by its per-sample maximum (``normalize="max"``, in [0, 1]; an all-zero map stays
    zero) or left as is (``"none"``: before/after maps then keep their relative size, which
    :func:`~md_plugin.report.plots.plot_gradient_overlays` reports).

    The model runs in eval mode: BatchNorm then uses running statistics, so samples do not
    interact and one backward pass of the *sum* of target logits yields every sample's own
    gradient exactly. Train/eval flags of every submodule are restored afterwards and the
    temporary hook is always removed. Batch the calls yourself for large N.

    ``to_map`` turns the module's output layout into [N, C, H, W] (``LayerRef.spatial_map``:
    NHWC maps and [N, L, C] tokens); without it the output must already be NCHW.
    """
    if normalize not in ("max", "none"):
        raise ValueError(f"normalize must be 'max' or 'none', got {normalize!r}")
    if not any(m is module for m in model.modules()):
        raise ValueError("module is not a submodule of model")
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if images.ndim != 4 or images.shape[0] != targets.shape[0]:
        raise ValueError(
            f"images must be [N, C, H, W] with one target each; got {tuple(images.shape)} "
            f"and {targets.shape[0]} targets"
        )
    device = _model_device(model)
    if device is not None:
        images, targets = images.to(device), targets.to(device)

    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, _inp: object, out: object) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or (to_map is None and out.ndim != 4):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"spatial gradient maps need a 4-D [N, C, H, W] output from the chosen layer, "
                f"got {shape}; pick a convolutional layer (a fully connected layer has no "
                f"spatial map)"
            )
        if captured:
            raise ValueError("module runs more than once per forward pass; its map is ambiguous")
        # Differentiate w.r.t. a detached leaf: works for frozen models and stops the backward
        # pass here. Downstream gets a clone, so an in-place op there (ReLU(inplace=True))
        # cannot modify or rebase the tensor we take the gradient against.
        feat = out.detach().requires_grad_(True)
        captured.append(feat)
        return feat.clone()

    modes = [(m, m.training) for m in model.modules()]
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(images)
            if not captured:
                raise ValueError("module did not run during the forward pass")
            if logits.ndim != 2:
                raise ValueError(
                    f"model must return [N, classes] logits; got {tuple(logits.shape)}"
                )
            picked = logits.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, captured[0])
            if to_map is not None:
                grad = to_map(grad)
                if grad is None:
                    raise ValueError("the chosen layer's output has no spatial grid")
    finally:
        handle.remove()
        for m, was_training in modes:
            m.training = was_training

    maps = grad.clamp(min=0).sum(dim=1)
    if normalize == "none":
        return maps.detach().float().cpu().numpy()
    peak = maps.flatten(1).amax(dim=1).clamp(min=torch.finfo(maps.dtype).tiny)
    maps = maps / peak[:, None, None]
    return maps.detach().float().cpu().numpy()
