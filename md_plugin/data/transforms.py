"""Train/eval transforms built on torchvision.transforms.v2, mask-aware.

v2 transforms apply the same random geometry to an image and a ``tv_tensors.Mask`` passed
together, which is exactly what the spatial loss needs (the official code cropped image and
mask at different offsets). Photometric ops and normalisation touch the image only.
Mean, std, size and crop_pct come from timm's ``resolve_data_config``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

__all__ = ["PairedTransform", "create_train_transform", "create_eval_transform"]

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
    "random": InterpolationMode.BILINEAR,
}


def _size(input_size: Sequence[int]) -> tuple[int, int]:
    return int(input_size[-2]), int(input_size[-1])


@dataclass
class PairedTransform:
    """geometry (image + optional mask) -> photometric (image) -> tensor + normalise (image)."""

    geometric: T.Transform
    photometric: T.Transform | None
    finish: T.Transform

    def __call__(self, img: Any, mask: torch.Tensor | None = None):
        img = (
            tv_tensors.Image(T.functional.pil_to_tensor(img))
            if not isinstance(img, torch.Tensor)
            else img
        )
        if mask is None:
            img = self.geometric(img)
        else:
            img, mask = self.geometric(img, tv_tensors.Mask(mask))
        if self.photometric is not None:
            img = self.photometric(img)
        img = self.finish(img)
        if mask is None:
            return img
        return img, mask.as_subclass(torch.Tensor)


def _finish(mean: Sequence[float], std: Sequence[float], reprob: float = 0.0) -> T.Transform:
    ops: list[T.Transform] = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if reprob > 0:
        ops.append(T.RandomErasing(p=reprob, value=0))
    return T.Compose(ops)


def create_train_transform(
    data_config: dict[str, Any],
    *,
    no_aug: bool = False,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float | None = 0.4,
    reprob: float = 0.0,
    crop_padding: int | None = None,
    interpolation: str | None = None,
) -> PairedTransform:
    """timm-style training transform; ``crop_padding`` selects CIFAR's pad-and-random-crop."""
    size = _size(data_config["input_size"])
    interp = _INTERP.get(
        interpolation or data_config.get("interpolation", "bilinear"), InterpolationMode.BILINEAR
    )
    if no_aug:
        return create_eval_transform(data_config)
    geo: list[T.Transform] = []
    if crop_padding is not None:
        geo += [T.Resize(size, interpolation=interp), T.RandomCrop(size, padding=crop_padding)]
    else:
        geo.append(
            T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interp)
        )
    if hflip > 0:
        geo.append(T.RandomHorizontalFlip(hflip))
    if vflip > 0:
        geo.append(T.RandomVerticalFlip(vflip))
    photo = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None
    return PairedTransform(
        T.Compose(geo), photo, _finish(data_config["mean"], data_config["std"], reprob)
    )


def create_eval_transform(data_config: dict[str, Any]) -> PairedTransform:
    """Resize to size / crop_pct, centre crop, normalise (timm's eval convention)."""
    size = _size(data_config["input_size"])
    crop_pct = data_config.get("crop_pct") or 1.0
    interp = _INTERP.get(data_config.get("interpolation", "bilinear"), InterpolationMode.BILINEAR)
    scaled = tuple(math.floor(s / crop_pct) for s in size)
    geo = T.Compose([T.Resize(scaled, interpolation=interp), T.CenterCrop(size)])
    return PairedTransform(geo, None, _finish(data_config["mean"], data_config["std"]))
