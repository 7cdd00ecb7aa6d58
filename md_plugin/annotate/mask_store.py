"""Load the foreground masks written by ``labelme_to_masks`` for the training dataset.

Masks are keyed by dataset index (``{index:06d}.png``). A mask that does not fit the dataset
(index out of range, wrong size) is skipped with a warning rather than stretched or cropped:
doing either silently is how a mask ends up describing the wrong pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ["MaskStoreWarning", "load_masks"]


class MaskStoreWarning(UserWarning):
    """A mask file was not loaded."""


def load_masks(
    mask_dir: str | Path,
    dataset_size: int | None = None,
    image_size: Sequence[int] | Callable[[int], Sequence[int]] | None = None,
) -> dict[int, np.ndarray]:
    """Return ``{dataset index: bool (H, W) foreground}`` from the PNGs in ``mask_dir``.

    ``image_size`` is the ``(height, width)`` of the dataset images, or a function of the index
    giving each image's own size (a folder of mixed sizes: every mask is checked against its own
    image, not image #0); pixels > 127 are foreground (files are written as 0/255). Files whose
    stem is not an integer are ignored with a warning; ``masks.json`` and other non-PNG files are
    ignored silently.

    Args:
        mask_dir: The folder ``labelme_to_masks`` wrote.
        dataset_size: Skip indices at or beyond it.
        image_size: ``(height, width)`` every mask must have, or a function of the index.

    Returns:
        Dataset index -> bool ``(H, W)`` foreground.

    Raises:
        DataError: The folder does not exist.
    """
    root = Path(mask_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"mask folder not found: {root}")
    if image_size is None or callable(image_size):
        size_of = image_size
    else:
        fixed = tuple(int(v) for v in image_size)
        size_of = lambda _i: fixed  # noqa: E731
    masks: dict[int, np.ndarray] = {}
    for path in sorted(root.iterdir()):
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        if not path.stem.isdigit():
            _warn(path, "file name is not a dataset index")
            continue
        index = int(path.stem)
        if dataset_size is not None and index >= dataset_size:
            _warn(path, f"index {index} is outside the dataset (size {dataset_size})")
            continue
        if index in masks:
            _warn(path, f"a mask for index {index} was already loaded")
            continue
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"))
        except OSError as e:
            _warn(path, f"cannot read image ({e})")
            continue
        want = tuple(int(v) for v in size_of(index)) if size_of is not None else None
        if want is not None and arr.shape != want:
            _warn(path, f"mask is {arr.shape[0]}x{arr.shape[1]}, images are {want[0]}x{want[1]}")
            continue
        masks[index] = arr > 127
    return masks


def _warn(path: Path, reason: str) -> None:
    warnings.warn(f"{path.name}: {reason} (skipped)", MaskStoreWarning, stacklevel=3)
