"""Dataset factory: timm's names plus CIFAR-LT and the bundled digits, never downloading silently.

``create_dataset`` handles our own names and hands the rest to ``timm.data.create_dataset``.
Every dataset returned yields raw ``(PIL image, int)`` items and exposes ``targets`` and
``classes``; transforms are applied by :class:`TransformedDataset`, which also pairs each image
with its foreground mask when one exists (the spatial loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .cifar import CIFAR10, CIFAR100
from .class_map import LabelledSubset, apply_class_cap, apply_class_map, parse_class_cap
from .split import stratified_split
from .targets import get_targets

__all__ = [
    "create_dataset",
    "create_datasets",
    "DataSplits",
    "TransformedDataset",
    "get_targets",
    "get_class_names",
    "resolve_num_classes",
    "DigitsDataset",
]

_TRAIN_SPLITS = ("train", "training")
_VAL_SPLITS = ("validation", "val", "valid", "eval", "evaluation", "test")


def _is_train(split: str) -> bool:
    return split.lower() in _TRAIN_SPLITS


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits, upsampled to RGB ``size`` px.

    Ships inside an installed package, so the quickstart needs no download. The split is a fixed
    stratified 80/20 partition (seed 0): 1438 train / 359 validation images.
    """

    def __init__(self, train: bool = True, size: int = 32):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError(
                "the digits dataset needs scikit-learn: pip install 'md-plugin[quickstart]'"
            ) from None
        from PIL import Image

        d = load_digits()
        rng = np.random.RandomState(0)
        idx_train, idx_val = [], []
        for c in range(10):
            idx = np.flatnonzero(d.target == c)
            rng.shuffle(idx)
            cut = int(round(0.8 * len(idx)))
            idx_train += idx[:cut].tolist()
            idx_val += idx[cut:].tolist()
        sel = np.array(sorted(idx_train if train else idx_val))
        imgs = (d.images[sel] / 16.0 * 255).astype(np.uint8)
        self.images = [
            Image.fromarray(im).resize((size, size), Image.BICUBIC).convert("RGB") for im in imgs
        ]
        self.targets = d.target[sel].astype(int).tolist()
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def _folder(root: Path, split: str):
    from torchvision.datasets import ImageFolder

    synonyms = _TRAIN_SPLITS if _is_train(split) else (split,) + _VAL_SPLITS
    for s in (split,) + tuple(synonyms):
        if (root / s).is_dir():
            try:
                return ImageFolder(str(root / s))
            except (FileNotFoundError, RuntimeError) as e:
                raise DataError(f"no images under {root / s}: {e}") from None
    raise DataError(f"no '{split}' folder (or synonym) under {root}")


def create_dataset(
    name: str,
    root: str | Path | None,
    split: str = "train",
    *,
    download: bool = False,
    imb_ratio: float = 100.0,
    imb_type: str = "exp",
    imb_seed: int = 0,
    input_size: int = 32,
    **kwargs: Any,
) -> Dataset:
    """Create an untransformed dataset by timm-style name.

    Names: ``''``/``folder`` (ImageFolder layout under ``root/<split>``), ``torch/cifar10``,
    ``torch/cifar100`` (also without the prefix), ``cifar10_lt``, ``cifar100_lt``,
    ``sklearn/digits``; anything else goes to ``timm.data.create_dataset``.
    """
    key = name.lower()
    if key.startswith(("torch/", "md/")) and key.split("/", 1)[1] in (
        "cifar10", "cifar100", "cifar10_lt", "cifar100_lt",
    ):  # fmt: skip
        key = key.split("/", 1)[1]
    if key == "sklearn/digits":
        return DigitsDataset(train=_is_train(split), size=input_size)
    if root is None or str(root) == "":
        raise DataError(f"dataset {name!r} needs --data-dir")
    root = Path(root).expanduser()
    if key in ("cifar10", "cifar100"):
        cls = CIFAR10 if key == "cifar10" else CIFAR100
        return cls(root, train=_is_train(split), download=download)
    if key in ("cifar10_lt", "cifar100_lt"):
        from .cifar_lt import CIFAR10LT, CIFAR100LT

        cls_lt = CIFAR10LT if key == "cifar10_lt" else CIFAR100LT
        return cls_lt(
            root, train=_is_train(split), imb_ratio=imb_ratio, imb_type=imb_type,
            imb_seed=imb_seed, download=download,
        )  # fmt: skip
    if key in ("", "folder", "imagefolder"):
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        return _folder(root, split)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    from timm.data import create_dataset as timm_create_dataset

    try:
        return timm_create_dataset(name, root=str(root), split=split, download=download, **kwargs)
    except (ValueError, RuntimeError, FileNotFoundError, AssertionError) as e:
        raise ConfigError(f"cannot create dataset {name!r}: {e}") from None


@dataclass
class DataSplits:
    """What a run trains on, selects on (``val``) and reports once at the end (``test``).

    Without a hold-out, ``val`` is the ``--val-split`` and ``test`` is ``None`` (timm's
    behaviour). With ``val_from_train``, ``val`` is carved from the training images and ``test``
    is the ``--val-split``. ``info`` records how the sets were made (for logs and args files).
    """

    train: Dataset
    val: Dataset
    test: Dataset | None
    info: dict[str, Any] = field(default_factory=dict)


def create_datasets(
    name: str,
    root: str | Path | None,
    train_split: str = "train",
    val_split: str = "validation",
    *,
    class_map: str | Path | Mapping[Any, Any] | None = None,
    class_cap: Sequence[str] | str | int | None = None,
    val_from_train: int | float | str | None = None,
    data_seed: int = 0,
    **kwargs: Any,
) -> DataSplits:
    """Train / val / test sets: ``create_dataset`` + class map + class cap + hold-out.

    Order: the class map (subset and relabel, both splits), then the per-class cap (training
    split only, seeded by ``data_seed``), then the stratified hold-out of ``val_from_train``
    images (or fraction) from what is left (``data_seed`` again). The same arguments always give
    the same three sets, so a later tool can rebuild the held-out images of a trained model from
    its ``args.yaml``.
    """
    train = create_dataset(name, root, train_split, **kwargs)
    evalset = create_dataset(name, root, val_split, **kwargs)
    info: dict[str, Any] = {}
    if class_map:
        train = apply_class_map(train, class_map, root)
        evalset = apply_class_map(evalset, class_map, root)
        info["classes"] = list(train.classes)  # type: ignore[attr-defined]
    targets = get_targets(train)
    if not targets:
        raise DataError("the training set is empty" + (" after --class-map" if class_map else ""))
    num_classes = len(train.classes) if class_map else max(targets) + 1  # type: ignore[attr-defined]
    if class_map:
        counts = np.bincount(targets, minlength=num_classes)
        empty = [c for c in range(num_classes) if counts[c] == 0]
        if empty:
            raise DataError(f"class map leaves class(es) {empty} without training images")
    caps = parse_class_cap(class_cap, num_classes)
    if caps:
        train = apply_class_cap(train, caps, data_seed)
        targets = get_targets(train)
        info["class_cap"] = {int(c): int(n) for c, n in sorted(caps.items())}
    if val_from_train is None or val_from_train == "" or val_from_train == 0:
        return DataSplits(train, evalset, None, info)
    keep, held = stratified_split(targets, val_from_train, data_seed)
    t = np.asarray(targets, dtype=np.int64)
    classes = get_class_names(train, num_classes)
    val = LabelledSubset(train, held, t[held], classes)
    train = LabelledSubset(train, keep, t[keep], classes)
    info["val_from_train"] = {
        "held_out": int(len(held)),
        "per_class": np.bincount(t[held], minlength=num_classes).tolist(),
        "seed": int(data_seed),
        "source_indices": val.source_indices.tolist(),
    }
    return DataSplits(train, val, evalset, info)


def resolve_num_classes(
    train: Dataset,
    evalsets: Sequence[tuple[str, Dataset]] = (),
    requested: int | None = None,
    train_targets: Sequence[int] | None = None,
) -> int:
    """The class count, with every label of every split checked against it before training.

    ``requested`` (``--num-classes``) wins, else the dataset's own class list, else the largest
    training label + 1. A label outside ``[0, count)`` in any split is a ``DataError`` naming the
    split, the label and where the count came from: caught now, not as a traceback in the middle
    of an epoch (or, for a validation label, after a whole training epoch), and never as a
    silently added class.
    """
    targets = list(train_targets) if train_targets is not None else get_targets(train)
    if not targets:
        raise DataError("the training set is empty")
    classes = getattr(train, "classes", None)
    known = len(classes) if isinstance(classes, Sequence) and len(classes) else None
    if requested is not None:
        n, why = int(requested), f"--num-classes {requested}"
    elif known is not None:
        n, why = known, f"the dataset's {known} class names"
    else:
        n, why = max(targets) + 1, f"{max(targets) + 1} classes (largest training label + 1)"
    for name, ds in evalsets:  # e.g. an ImageFolder split with a class folder more or less
        other = getattr(ds, "classes", None)
        if known is not None and isinstance(other, Sequence) and list(other) != list(classes):
            extra = [c for c in other if c not in classes] or [c for c in classes if c not in other]
            raise DataError(
                f"the {name} split's classes differ from the training split's "
                f"({len(other)} vs {known}, e.g. {extra[0] if extra else 'another order'!r}): "
                "the same label would mean different classes"
            )
    splits = [("training", targets)] + [(name, get_targets(ds)) for name, ds in evalsets]
    for name, labels in splits:
        bad = [v for v in labels if not 0 <= v < n]
        if bad:
            raise DataError(
                f"the {name} split has {len(bad)} label(s) outside [0, {n}) (e.g. {bad[0]}), "
                f"the class count set by {why}"
            )
    return n


def get_class_names(ds: Dataset, num_classes: int) -> list[str]:
    classes = getattr(ds, "classes", None)
    if classes is not None and len(classes) == num_classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(num_classes)]


class TransformedDataset(Dataset):
    """Apply a (paired) transform; with ``masks`` yield ``(img, target, mask, has_mask)``.

    ``masks`` maps dataset index -> bool HxW foreground array at the dataset image size.
    Unannotated items get an all-foreground mask and ``has_mask=False``, so the spatial loss
    ignores them.
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable,
        masks: dict[int, np.ndarray] | None = None,
    ):
        self.base = base
        self.transform = transform
        self.masks = masks

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        try:
            img, target = self.base[i]
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unreadable or truncated file
            samples = getattr(self.base, "samples", None) or getattr(self.base, "imgs", None)
            where = f" {samples[i][0]}" if samples is not None and i < len(samples) else f" #{i}"
            msg = " ".join(str(e).split()) or type(e).__name__
            raise DataError(
                f"cannot read image{where}: {msg}; remove or replace the file"
            ) from None
        if self.masks is None:
            return self.transform(img), target
        m = self.masks.get(i)
        has = m is not None
        if m is None:
            w, h = img.size
            m = np.ones((h, w), dtype=bool)
        x, mask = self.transform(img, torch.from_numpy(np.asarray(m, dtype=np.uint8)))
        return x, target, mask[None].float(), has
