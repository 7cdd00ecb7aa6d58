"""CIFAR-10/100 read from the standard python folders, never downloaded unless asked.

torchvision's classes refuse any file whose md5 differs from the published one, which rules out
small fixtures written in the same format. These subclasses check that the files exist and
parse; ``verify_md5=True`` restores torchvision's check.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torchvision import datasets as tvd

from ..errors import DataError

__all__ = ["CIFAR10", "CIFAR100", "resolve_cifar_root"]

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

    def __init__(self, root, train: bool = True, transform=None, target_transform=None,
                 download: bool = False, verify_md5: bool = False):  # fmt: skip
        self.verify_md5 = verify_md5
        if not download:
            root = resolve_cifar_root(root, self.variant)
        super().__init__(str(root), train=train, transform=transform,  # type: ignore[call-arg]
                         target_transform=target_transform, download=download)  # fmt: skip

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
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = data[self.meta["key"]]  # type: ignore[attr-defined]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10(_PresenceCheck, tvd.CIFAR10):
    """torchvision CIFAR10 that accepts any well-formed folder (``root`` may be the batches dir)."""

    variant = "cifar10"


class CIFAR100(_PresenceCheck, tvd.CIFAR100):
    """torchvision CIFAR100 that accepts any well-formed folder (``root`` may be the python dir)."""

    variant = "cifar100"
