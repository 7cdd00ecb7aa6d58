"""CIFAR-10/100 read from the standard python folders, never downloaded unless asked.

torchvision's classes refuse any file whose md5 differs from the published one, which rules out
small fixtures written in the same format. These subclasses check that the files exist and
parse; ``verify_md5=True`` restores torchvision's check.

The batches are read with a restricted unpickler (numpy arrays and plain values only) and
checked as they load: a truncated, empty or foreign file, a wrong pixel layout or a label outside
the class range is one ``DataError`` naming the file, never a traceback from deep inside pickle
or numpy and never a silently different dataset.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torchvision import datasets as tvd

from ..errors import DataError

__all__ = ["CIFAR10", "CIFAR100", "resolve_cifar_root", "read_cifar_pickle"]

# what the published CIFAR pickles (and fixtures.write_cifar) reference: numpy arrays, and
# _codecs.encode for bytes written by Python 3 at protocol 2
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads numpy arrays and plain values; any other global means "not a CIFAR file"."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | Path) -> Any:
    """Unpickle one CIFAR file (latin1, as torchvision does); damage becomes a DataError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"cannot read CIFAR file {path}: {e.strerror or e}") from None
    except Exception as e:  # a damaged pickle makes the unpickler raise almost any type
        why = "empty file" if path.stat().st_size == 0 else " ".join(str(e).split())[:120]
        raise DataError(
            f"CIFAR file {path} is damaged or not a CIFAR pickle ({why or type(e).__name__}); "
            "extract it again from the archive"
        ) from None


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """One data batch as (N x 3072 uint8 rows, N labels in [0, num_classes))."""
    entry = read_cifar_pickle(path)

    def bad(why: str) -> DataError:
        return DataError(
            f"CIFAR file {path} is malformed: {why}; extract it again from the archive"
        )

    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise bad(f"expected a dict with 'data' and {label_key!r}")
    data, labels = entry["data"], entry[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise bad("'data' is not a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise bad(f"rows of {data.shape[1]} values, expected 3072 (3x32x32)")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        raise bad(f"{label_key!r} is not a list of integers")
    if len(labels) != data.shape[0]:
        raise bad(f"{len(labels)} labels for {data.shape[0]} images")
    out = [v for v in labels if not 0 <= v < num_classes]
    if out:
        raise bad(f"label {out[0]} is outside the {num_classes} classes")
    return data, labels


_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def resolve_cifar_root(root: str | Path, variant: str) -> Path:
    """Return the parent of the CIFAR batches folder; accept the folder itself too."""
    root = Path(root).expanduser()
    folder = _FOLDERS[variant]
    if root.name == folder:
        root = root.parent
    if not (root / folder).is_dir():
        other = [v for v, f in _FOLDERS.items() if v != variant and (root / f).is_dir()]
        hint = (
            f" (found {_FOLDERS[other[0]]}: that is {other[0].upper()}, use a {other[0]} dataset name)"
            if other
            else ""
        )
        raise DataError(
            f"{variant.upper()} not found: expected the folder {root / folder}{hint}. "
            f"Extract cifar-{variant[5:]}-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
            "into --data-dir, or pass --dataset-download"
        )
    return root


class _PresenceCheck:
    """Shared by both variants: accept the batches folder as root, check presence not md5."""

    variant = ""
    verify_md5: bool = False

    num_classes = 10
    label_key = "labels"

    def __init__(self, root, train: bool = True, transform=None, target_transform=None,
                 download: bool = False, verify_md5: bool = False):  # fmt: skip
        self.verify_md5 = verify_md5
        if not download:
            root = resolve_cifar_root(root, self.variant)
        # torchvision's __init__ minus its unchecked pickle.load of every batch
        tvd.VisionDataset.__init__(self, str(root), transform=transform,  # type: ignore[arg-type]
                                   target_transform=target_transform)  # fmt: skip
        self.train = train
        if download:
            self.download()  # type: ignore[attr-defined]
        if not self._check_integrity():
            raise DataError(f"{self.variant.upper()} files missing under {root}")
        base = Path(self.root) / self.base_folder  # type: ignore[attr-defined]
        files = self.train_list if train else self.test_list  # type: ignore[attr-defined]
        data, targets = [], []
        for name, _md5 in files:  # md5s were checked by _check_integrity with verify_md5
            d, t = _read_batch(base / name, self.label_key, self.num_classes)
            data.append(d)
            targets += t
        self.data = np.concatenate(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = targets
        self._load_meta()

    def _check_integrity(self) -> bool:  # torchvision hook
        if self.verify_md5:
            return super()._check_integrity()  # type: ignore[misc]
        base = Path(self.root) / self.base_folder  # type: ignore[attr-defined]
        return all((base / name).is_file() for name, _ in self.train_list + self.test_list)  # type: ignore[attr-defined]

    def _load_meta(self) -> None:  # torchvision hook; same parsing, md5 optional
        path = Path(self.root) / self.base_folder / self.meta["filename"]  # type: ignore[attr-defined]
        if not path.is_file():
            raise DataError(f"CIFAR metadata file missing: {path}")
        if self.verify_md5:
            return super()._load_meta()  # type: ignore[misc]
        data = read_cifar_pickle(path)
        key = self.meta["key"]  # type: ignore[attr-defined]
        names = data.get(key) if isinstance(data, dict) else None
        if (
            not isinstance(names, list)
            or len(names) != self.num_classes
            or not all(isinstance(n, str) for n in names)
        ):
            raise DataError(
                f"CIFAR metadata file {path} is malformed: expected {key!r} with "
                f"{self.num_classes} class names; extract it again from the archive"
            )
        self.classes = names
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10(_PresenceCheck, tvd.CIFAR10):
    """torchvision CIFAR10 that accepts any well-formed folder (``root`` may be the batches dir)."""

    variant = "cifar10"


class CIFAR100(_PresenceCheck, tvd.CIFAR100):
    """torchvision CIFAR100 that accepts any well-formed folder (``root`` may be the python dir)."""

    variant = "cifar100"
    num_classes = 100
    label_key = "fine_labels"
