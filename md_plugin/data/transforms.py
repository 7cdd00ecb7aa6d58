"""Train/eval transforms: torchvision.transforms.v2 geometry (mask-aware) + timm's own augmentation.

v2 transforms apply the same random geometry to an image and a ``tv_tensors.Mask`` passed
together, which is exactly what the spatial loss needs (the official code cropped image and
mask at different offsets). The photometric stage is timm's: ``transforms_imagenet_train``'s
"secondary" transforms (RandAugment / AugMix / AutoAugment via ``--aa``, colour jitter and its
probability, grayscale, Gaussian blur), built by timm from the same options as timm's
``train.py``; it touches the image only. Random erasing is timm's ``RandomErasing`` (``--remode``
const/rand/pixel, ``--recount``). timm's keep-ratio crop modes (``rkrc``/``rkrr``) run timm's own
PIL geometry and cannot carry a mask. Mean, std, size and crop_pct come from timm's
``resolve_data_config``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..errors import ConfigError

__all__ = [
    "PairedTransform",
    "create_train_transform",
    "create_eval_transform",
    "train_transform_kwargs",
]

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
_RANDOM_INTERP = ("bilinear", "bicubic")  # timm's 'random': one of these per image


def _size(input_size: Sequence[int]) -> tuple[int, int]:
    return int(input_size[-2]), int(input_size[-1])


@dataclass
class PairedTransform:
    """[timm PIL geometry] -> v2 geometry (image + optional mask) -> photometric (image) -> finish.

    ``pil_geometric`` (timm's keep-ratio crop modes) cannot move a mask: a mask is refused.
    ``photometric`` is timm's secondary stage and runs on a PIL image.
    """

    geometric: Callable
    photometric: Callable | None
    finish: Callable
    pil_geometric: Callable | None = None

    def __call__(self, img: Any, mask: torch.Tensor | None = None):
        if self.pil_geometric is not None:
            if mask is not None:
                raise ConfigError(
                    "foreground masks cannot follow timm's keep-ratio crop (--train-crop-mode "
                    "rkrc/rkrr); use rrc or --crop-padding with --md-masks"
                )
            img = self.pil_geometric(img)
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
            pil = T.functional.to_pil_image(img.as_subclass(torch.Tensor))
            img = tv_tensors.Image(T.functional.pil_to_tensor(self.photometric(pil)))
        img = self.finish(img)
        if mask is None:
            return img
        return img, mask.as_subclass(torch.Tensor)


def _finish(
    mean: Sequence[float],
    std: Sequence[float],
    reprob: float = 0.0,
    remode: str = "pixel",
    recount: int = 1,
) -> T.Transform:
    ops: list[Callable] = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if reprob > 0:
        ops.append(create_random_erasing(reprob, remode, recount))
    return T.Compose(ops)


def create_random_erasing(reprob: float, remode: str = "pixel", recount: int = 1, device="cpu"):
    """timm's RandomErasing on normalised tensors: ``const`` zeros, ``rand`` one normal colour
    per box, ``pixel`` normal noise per pixel; 1 to ``recount`` boxes. A [B, C, H, W] batch with
    ``num_splits=2`` spares its first half (timm's ``--resplit``)."""
    from timm.data.random_erasing import RandomErasing

    if remode not in ("const", "rand", "pixel"):
        raise ConfigError(f"--remode must be const, rand or pixel, got {remode!r}")
    return RandomErasing(reprob, mode=remode, max_count=recount, device=str(device))


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits: timm's strongest level keeps 0 bits, which Pillow >= 11
    refuses (it used to return a black image, which is what 0 bits means)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(t: Any) -> None:
    """Give every timm Posterize op of an (Rand/Auto/AugMix) augment pipeline the 0-bit fix."""
    if getattr(t, "name", "").startswith("Posterize") and hasattr(t, "aug_fn"):
        t.aug_fn = _posterize_any_bits
    for attr in ("transforms", "ops", "policy"):
        for child in getattr(t, attr, None) or []:
            for c in child if isinstance(child, (list, tuple)) else [child]:
                _fix_posterize(c)


def _train_rrc(size, scale, ratio, interpolation: str) -> T.Transform:
    def rrc(name: str) -> T.Transform:
        return T.RandomResizedCrop(
            size, scale=tuple(scale), ratio=tuple(ratio), interpolation=_INTERP[name]
        )

    if interpolation == "random":
        return T.RandomChoice([rrc(n) for n in _RANDOM_INTERP])
    return rrc(interpolation)


def _timm_stages(data_config, size, crop_mode, interpolation, **options):
    """timm's (primary, secondary, final) train transforms for these options."""
    from timm.data.transforms_factory import transforms_imagenet_train

    return transforms_imagenet_train(
        img_size=size, train_crop_mode=crop_mode, interpolation=interpolation,
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), separate=True, **options,
    )  # fmt: skip


def create_train_transform(
    data_config: dict[str, Any],
    *,
    no_aug: bool = False,
    train_crop_mode: str | None = None,
    scale: Sequence[float] | None = (0.08, 1.0),
    ratio: Sequence[float] | None = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float | None = 0.4,
    color_jitter_prob: float | None = None,
    grayscale_prob: float | None = None,
    gaussian_blur_prob: float | None = None,
    auto_augment: str | None = None,
    reprob: float = 0.0,
    remode: str = "pixel",
    recount: int = 1,
    crop_padding: int | None = None,
    interpolation: str | None = None,
) -> PairedTransform:
    """timm-style training transform with timm's options (``--aa``, probabilities, crop modes).

    ``interpolation``: ``'random'`` (timm's default: bilinear or bicubic per image), a name, or
    ``None``/``''`` for the model's. ``crop_padding`` selects CIFAR's pad-and-random-crop.
    """
    if no_aug:
        return create_eval_transform(data_config)
    size = _size(data_config["input_size"])
    interp = interpolation or data_config.get("interpolation") or "bilinear"
    if interp not in _INTERP and interp != "random":
        raise ConfigError(
            f"interpolation {interp!r}: choose from random, bilinear, bicubic, nearest"
        )
    crop_mode = train_crop_mode or "rrc"
    if crop_mode not in ("rrc", "rkrc", "rkrr"):
        raise ConfigError(f"--train-crop-mode must be rrc, rkrc or rkrr, got {train_crop_mode!r}")
    try:
        primary, secondary, _ = _timm_stages(
            data_config, size, crop_mode, interp, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
            color_jitter=color_jitter or None, color_jitter_prob=color_jitter_prob,
            grayscale_prob=grayscale_prob or 0.0, gaussian_blur_prob=gaussian_blur_prob or 0.0,
            auto_augment=auto_augment or None,
        )  # fmt: skip
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        what = f"--aa {auto_augment!r}" if auto_augment else "the augmentation options"
        raise ConfigError(f"timm rejected {what}: {e or type(e).__name__}") from None
    pil_geo = None
    geo: list[Callable] = []
    if crop_padding is not None:
        geo += [
            T.Resize(size, interpolation=_INTERP.get(interp, InterpolationMode.BILINEAR)),
            T.RandomCrop(size, padding=crop_padding),
        ]
    elif crop_mode == "rrc":
        geo.append(_train_rrc(size, scale or (0.08, 1.0), ratio or (3.0 / 4.0, 4.0 / 3.0), interp))
    else:  # timm's keep-ratio resize + centre/random crop-or-pad, flips included
        pil_geo = primary
    if pil_geo is None:
        if hflip > 0:
            geo.append(T.RandomHorizontalFlip(hflip))
        if vflip > 0:
            geo.append(T.RandomVerticalFlip(vflip))
    _fix_posterize(secondary)
    photo = secondary if secondary.transforms else None
    return PairedTransform(
        T.Compose(geo) if geo else T.Identity(),
        photo,
        _finish(data_config["mean"], data_config["std"], reprob, remode, recount),
        pil_geo,
    )


def train_transform_kwargs(args) -> dict[str, Any]:
    """``create_train_transform`` options from train_md.py / timm args (cf. timm's
    ``optimizer_kwargs``). With ``--resplit`` random erasing moves to the batch (see
    ``create_random_erasing``), so the per-image transform does not erase."""
    return dict(
        no_aug=args.no_aug, train_crop_mode=args.train_crop_mode, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa,
        reprob=0.0 if args.resplit else args.reprob, remode=args.remode, recount=args.recount,
        crop_padding=args.crop_padding, interpolation=args.train_interpolation or None,
    )  # fmt: skip


def create_eval_transform(data_config: dict[str, Any]) -> PairedTransform:
    """Resize to size / crop_pct, centre crop, normalise (timm's eval convention)."""
    size = _size(data_config["input_size"])
    crop_pct = data_config.get("crop_pct") or 1.0
    interp = _INTERP.get(data_config.get("interpolation") or "bilinear", InterpolationMode.BILINEAR)
    scaled = tuple(math.floor(s / crop_pct) for s in size)
    geo = T.Compose([T.Resize(scaled, interpolation=interp), T.CenterCrop(size)])
    return PairedTransform(geo, None, _finish(data_config["mean"], data_config["std"]))
