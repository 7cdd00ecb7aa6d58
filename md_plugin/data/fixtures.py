"""Writers for small datasets in the real on-disk formats, for tests and demos.

``write_cifar`` writes the python-pickle layout that torchvision's CIFAR10/CIFAR100 read
(``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``, or
``cifar-100-python/train``, ``test``, ``meta``). Labels can be given exactly (e.g. the full
50,000-label list of real CIFAR) while the pixels are synthetic, which is what the long-tail
count tests need.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _balanced_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.RandomState(seed).shuffle(labels)
    return labels


def _default_pixels(labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Class-dependent colour plus noise, so a tiny model can learn the labels."""
    n = len(labels)
    num_classes = int(labels.max()) + 1 if n else 1
    base = (np.arange(num_classes)[:, None] * np.array([37, 91, 151]) % 200 + 28).astype(np.float32)
    img = base[labels][:, :, None, None] + rng.normal(0, 20, size=(n, 3, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar(
    root: str | Path,
    variant: str = "cifar10",
    train_labels: Sequence[int] | None = None,
    test_labels: Sequence[int] | None = None,
    train_per_class: int = 20,
    test_per_class: int = 10,
    pixels: Callable[[np.ndarray, np.random.RandomState], np.ndarray] | None = None,
    seed: int = 0,
) -> Path:
    """Write a CIFAR-10 or CIFAR-100 folder under ``root``; returns the batches folder.

    ``pixels(labels, rng)`` returns uint8 rows of 3072 values (CHW order, as in CIFAR).
    """
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"variant must be cifar10 or cifar100, got {variant!r}")
    num_classes = 10 if variant == "cifar10" else 100
    rng = np.random.RandomState(seed)
    pixels = pixels or _default_pixels
    tr = np.asarray(
        train_labels
        if train_labels is not None
        else _balanced_labels(num_classes, train_per_class, seed)
    )
    te = np.asarray(
        test_labels
        if test_labels is not None
        else _balanced_labels(num_classes, test_per_class, seed + 1)
    )
    root = Path(root)
    if variant == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(len(tr)), 5)
        for i, idx in enumerate(chunks, 1):
            _dump(folder / f"data_batch_{i}", {
                "batch_label": f"training batch {i} of 5",
                "labels": tr[idx].tolist(),
                "data": pixels(tr[idx], rng),
                "filenames": [f"img_{j}.png" for j in idx],
            })  # fmt: skip
        _dump(folder / "test_batch", {
            "batch_label": "testing batch 1 of 1",
            "labels": te.tolist(),
            "data": pixels(te, rng),
            "filenames": [f"test_{j}.png" for j in range(len(te))],
        })  # fmt: skip
        _dump(folder / "batches.meta", {
            "label_names": list(CIFAR10_CLASSES),
            "num_cases_per_batch": 10000,
            "num_vis": 3072,
        })  # fmt: skip
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, labels in (("train", tr), ("test", te)):
            _dump(folder / name, {
                "filenames": [f"{name}_{j}.png" for j in range(len(labels))],
                "batch_label": f"{name} batch",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": pixels(labels, rng),
            })  # fmt: skip
        _dump(folder / "meta", {
            "fine_label_names": [f"class_{i:02d}" for i in range(100)],
            "coarse_label_names": [f"super_{i:02d}" for i in range(20)],
        })  # fmt: skip
    return folder


def _dump(path: Path, obj: dict) -> None:
    """Protocol 2 with str keys: what the original Python 2 cPickle files decode to."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_image_folder(
    root: str | Path,
    num_classes: int = 3,
    train_per_class: int = 8,
    val_per_class: int = 4,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """An ImageFolder tree ``root/{train,validation}/class_<i>/<n>.png`` (timm's folder layout).

    Pixels are class-coloured noise (as ``write_cifar``), ``size`` is (H, W), deliberately not
    square and not the training size so crops and resizes act.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.RandomState(seed)
    h, w = size
    for split, per_class in (("train", train_per_class), ("validation", val_per_class)):
        for c in range(num_classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([37, 91, 151]) * (c + 1) % 200 + 28
            for i in range(per_class):
                img = np.clip(base + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root
