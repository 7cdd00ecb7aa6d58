"""Class subsets, remapping and per-class caps for any dataset with integer targets.

``--class-map`` follows timm (``timm.data.readers.class_map.load_class_map``): a ``.txt`` file
with one class name per line, the line number being the new index, or a ``.pkl`` dict
``{class_name: new_index}``; a relative path is also looked up under ``--data-dir``; classes not
in the map are dropped (timm's folder reader does the same). timm applies it only to folder
datasets; here it works for every dataset (CIFAR included), and two extensions make it usable
on datasets whose classes are numbered: a line (or key) that names no class but is an integer is
a *source class index*, and ``.yaml``/``.json`` files may hold the same dict as the ``.pkl``.
Several classes may map to one index (dict forms only). The new indices must be exactly
``0..K-1``.

``--class-cap`` limits the number of images per class (after mapping), drawn with a seed, e.g.
the paper's CNNSplitter patch setup cuts the target class to 500 training images.
"""

from __future__ import annotations

import difflib
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from ..errors import ConfigError
from .targets import get_targets

__all__ = [
    "LabelledSubset",
    "load_class_map",
    "resolve_class_map",
    "apply_class_map",
    "parse_class_cap",
    "cap_indices",
    "apply_class_cap",
]


class LabelledSubset(Dataset):
    """Items ``indices`` of ``base`` with new ``targets`` and ``classes``.

    ``source_indices`` are the positions in the *original* dataset (nested subsets are
    flattened), which is what masks, hold-out files and reports need to name an image.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int] | np.ndarray,
        targets: Sequence[int] | np.ndarray,
        classes: Sequence[str],
    ):
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) != len(targets):
            raise ValueError("indices and targets differ in length")
        if isinstance(base, LabelledSubset):  # flatten: one lookup per item
            idx = base.indices[idx]
            base = base.base
        self.base = base
        self.indices = idx
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        src = getattr(base, "source_indices", None)
        self.source_indices = np.asarray(src)[idx] if src is not None else idx

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, _ = self.base[int(self.indices[i])]
        return img, self.targets[i]


def _source_names(ds: Dataset, targets: Sequence[int]) -> list[str]:
    classes = getattr(ds, "classes", None)
    n = (max(targets) + 1) if len(targets) else 0
    if classes is not None and len(classes) >= n:
        return [str(c) for c in classes]
    return [str(i) for i in range(n)]


def load_class_map(path: str | Path, root: str | Path | None = None) -> dict[Any, int]:
    """Read a class-map file into ``{name_or_index: new_index}`` (timm's formats, plus YAML/JSON)."""
    p = Path(path).expanduser()
    if not p.is_file() and root is not None and (Path(root) / p).is_file():
        p = Path(root) / p
    if not p.is_file():
        raise ConfigError(f"class map file not found: {path}")
    ext = p.suffix.lower()
    try:
        if ext == ".txt":
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
            while lines and not lines[-1]:
                lines.pop()
            out: dict[Any, int] = {}
            for i, name in enumerate(lines):
                if not name:
                    raise ConfigError(f"{p}: line {i + 1} is empty (one class per line)")
                if name in out:
                    raise ConfigError(
                        f"{p}: class {name!r} is listed twice (lines {out[name] + 1} and {i + 1})"
                    )
                out[name] = i
            raw: Any = out
        elif ext in (".pkl", ".pickle"):

            class _NoGlobals(pickle.Unpickler):  # a class map is a plain dict: no code
                def find_class(self, module, name):
                    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

            with open(p, "rb") as f:
                raw = _NoGlobals(f).load()
        elif ext in (".yaml", ".yml"):
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        elif ext == ".json":
            raw = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise ConfigError(
                f"class map {p}: unsupported extension {ext!r} (use .txt, .pkl, .yaml or .json)"
            )
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of a user file is one line
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"cannot read class map {p}: {msg}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"class map {p} must be a non-empty list of classes or a mapping")
    return dict(raw)


def resolve_class_map(
    class_map: Mapping[Any, Any], source_names: Sequence[str], where: str = "class map"
) -> dict[int, int]:
    """``{name_or_index: new}`` -> ``{source_index: new_index}``, validated.

    A key is matched against the class names first, then read as a source index. The new
    indices must be integers covering ``0..K-1`` exactly.
    """
    lookup = {n: i for i, n in enumerate(source_names)}
    out: dict[int, int] = {}
    for key, new in class_map.items():
        if isinstance(key, str) and key in lookup:
            src = lookup[key]
        else:
            try:
                src = int(key)
                if isinstance(key, (float, bool)) or (
                    isinstance(key, str) and str(src) != key.strip()
                ):
                    raise ValueError
            except (TypeError, ValueError):
                near = difflib.get_close_matches(str(key), list(source_names), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{where}: unknown class {key!r}{hint}") from None
            if not 0 <= src < len(source_names):
                raise ConfigError(
                    f"{where}: class index {src} is out of range (the dataset has "
                    f"{len(source_names)} classes, 0-{len(source_names) - 1})"
                )
        if isinstance(new, bool) or not isinstance(new, (int, np.integer)) or new < 0:
            raise ConfigError(
                f"{where}: class {key!r} maps to {new!r}; new indices must be integers >= 0"
            )
        if src in out:
            raise ConfigError(f"{where}: class {source_names[src]!r} (index {src}) appears twice")
        out[src] = int(new)
    used = sorted(set(out.values()))
    if used != list(range(len(used))):
        missing = sorted(set(range(max(used) + 1)) - set(used))
        raise ConfigError(
            f"{where}: new class indices must be 0..{max(used)} without gaps (missing {missing})"
        )
    return out


def apply_class_map(
    ds: Dataset, class_map: str | Path | Mapping[Any, Any], root: str | Path | None = None
) -> LabelledSubset:
    """Keep only the mapped classes of ``ds`` and relabel them (timm's ``--class-map``)."""
    raw = load_class_map(class_map, root) if isinstance(class_map, (str, Path)) else class_map
    where = f"class map {class_map}" if isinstance(class_map, (str, Path)) else "class map"
    targets = get_targets(ds)
    names = _source_names(ds, targets)
    mapping = resolve_class_map(raw, names, where)
    k = max(mapping.values()) + 1
    new_names = ["+".join(names[s] for s in sorted(mapping) if mapping[s] == j) for j in range(k)]
    t = np.asarray(targets, dtype=np.int64)
    lut = np.full(len(names), -1, dtype=np.int64)
    for s, j in mapping.items():
        lut[s] = j
    new_t = lut[t] if len(t) else t
    keep = np.flatnonzero(new_t >= 0)
    return LabelledSubset(ds, keep, new_t[keep], new_names)


def parse_class_cap(items: Sequence[str] | str | int | None, num_classes: int) -> dict[int, int]:
    """``['500']`` -> every class at most 500; ``['5=500', '0=100']`` -> per class.

    Class indices are those after ``--class-map``. A per-class entry overrides the global one.
    """
    if items is None or items == [] or items == "":
        return {}
    if isinstance(items, (str, int)):
        items = [str(items)]
    caps: dict[int, int] = {}
    default: int | None = None
    for it in items:
        s = str(it).strip()
        try:
            if "=" in s:
                c_str, n_str = s.split("=", 1)
                c, n = int(c_str), int(n_str)
                if not 0 <= c < num_classes:
                    raise ConfigError(
                        f"--class-cap {s!r}: class {c} is out of range (0-{num_classes - 1} after --class-map)"
                    )
            else:
                c, n = -1, int(s)
        except ValueError:
            raise ConfigError(
                f"--class-cap expects N (every class) or CLASS=N, got {s!r}"
            ) from None
        if n < 1:
            raise ConfigError(f"--class-cap {s!r}: the cap must be >= 1 image")
        if c < 0:
            default = n
        else:
            caps[c] = n
    if default is not None:
        for c in range(num_classes):
            caps.setdefault(c, default)
    return caps


def cap_indices(
    targets: Sequence[int] | np.ndarray, caps: Mapping[int, int], seed: int = 0
) -> np.ndarray:
    """Sorted positions kept when class ``c`` keeps at most ``caps[c]`` images.

    One ``RandomState(seed)`` shuffles each capped class's positions in class order, so a cap
    on one class does not change which images another class keeps.
    """
    t = np.asarray(targets, dtype=np.int64)
    keep = np.ones(len(t), dtype=bool)
    rng = np.random.RandomState(seed)
    for c in sorted(caps):
        idx = np.flatnonzero(t == c)
        if len(idx) <= caps[c]:
            continue
        rng.shuffle(idx)
        keep[idx[caps[c] :]] = False
    return np.flatnonzero(keep)


def apply_class_cap(ds: Dataset, caps: Mapping[int, int], seed: int = 0) -> Dataset:
    """``ds`` with at most ``caps[c]`` images of class ``c`` (seeded); ``ds`` itself if none apply."""
    if not caps:
        return ds
    targets = get_targets(ds)
    keep = cap_indices(targets, caps, seed)
    if len(keep) == len(targets):
        return ds
    t = np.asarray(targets, dtype=np.int64)
    return LabelledSubset(ds, keep, t[keep], _source_names(ds, targets))
