"""A flat folder of images that labelme opens directly, plus the map back to dataset indices.

Model Doctor's spatial term needs foreground masks drawn by a person on the low-confidence
training images. ``write_workspace`` writes those images as ``{index:06d}_{class}.png`` in one
folder (``labelme out_dir`` opens it, and labelme saves ``<stem>.json`` beside each image) and
records in ``index.csv`` / ``index.json`` which dataset index, label and sizes every file stands
for. The file name is only a convenience: ``labelme_to_masks`` trusts ``index.csv``, so masks
can never be given to the wrong image.

Small images (CIFAR is 32x32) are hard to outline, so ``size`` enlarges them. ``nearest`` (the
default) keeps every dataset pixel an exact block, so a drawn outline maps back to dataset pixels
without blur; ``bicubic`` looks smoother but invents in-between colours.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, MDError
from ..files import atomic_write, atomic_write_text

__all__ = ["INDEX_COLUMNS", "write_workspace", "read_index", "workspace_file_name"]

INDEX_COLUMNS = (
    "file", "index", "label", "class_name", "pred", "confidence",
    "width", "height", "orig_width", "orig_height",
)  # fmt: skip

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}


def workspace_file_name(index: int, class_name: str) -> str:
    """``000123_cat.png``; odd characters in class names become ``_`` so every OS accepts it.

    Args:
        index: The dataset index.
        class_name: The image's class name.

    Returns:
        The file name.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(class_name)).strip("._") or "class"
    return f"{int(index):06d}_{safe}.png"


def _field(record: Any, key: str) -> Any:
    """Records may be dicts or dataclasses (e.g. ``SiftRecord``)."""
    if isinstance(record, Mapping):
        if key not in record:
            raise ConfigError(f"annotation record has no {key!r}: {dict(record)}")
        return record[key]
    if not hasattr(record, key):
        raise ConfigError(f"annotation record has no {key!r}: {record!r}")
    return getattr(record, key)


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ConfigError(f"size must be an int or (height, width), got {size!r}")
        h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"size must be positive, got {size!r}")
    return h, w


def _to_pil(item: Any, index: int) -> Image.Image:
    """The raw dataset image; a tensor means a transform is attached, which would crop/scale."""
    if isinstance(item, Image.Image):
        return item.convert("RGB") if item.mode not in ("RGB", "L") else item
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (2, 3):
        return Image.fromarray(item)
    raise DataError(
        f"dataset[{index}] gave {type(item).__name__}, expected a PIL image: "
        "pass the dataset without transforms so the annotated pixels are the dataset's own"
    )


def write_workspace(
    out_dir: str | Path,
    records: Sequence[Any],
    dataset: Any,
    class_names: Sequence[str],
    size: int | Sequence[int] | None = None,
    overwrite: bool = False,
    *,
    resample: str = "nearest",
) -> Path:
    """Write one PNG per record and ``index.csv``/``index.json`` into ``out_dir``; return it.

    ``size`` is an int (square) or ``(height, width)``; ``None`` keeps the dataset size.
    A non-empty ``out_dir`` is refused unless ``overwrite=True``; even then only the images and
    index files are rewritten. Existing labelme JSON files are never deleted, and index rows of
    files this call does not rewrite are kept, so earlier annotations still map to their index.

    Args:
        out_dir: The workspace folder.
        records: Dicts or objects with ``index``, ``label``, ``pred`` and ``confidence``.
        dataset: The dataset without transforms (``dataset[i]`` gives a PIL image first).
        class_names: Name per label.
        size: Enlarge the images to this size (int or ``(height, width)``).
        overwrite: Write into a non-empty workspace.
        resample: ``nearest`` (exact pixel blocks) or ``bicubic``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: A bad record, size or resample option.
        MDError: A non-empty workspace without ``overwrite``, or a failed write.
    """
    hw = _as_size(size)
    if resample not in _RESAMPLE:
        raise ConfigError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MDError(f"annotation workspace {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MDError(
            f"annotation workspace {out} is not empty; choose a new folder or pass overwrite "
            "(existing labelme .json files are kept)"
        )
    out.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict[str, Any]] = {}
    if overwrite and (out / "index.csv").is_file():
        rows = {r["file"]: r for r in read_index(out).values()}

    n = len(dataset)
    seen: set[int] = set()
    for rec in records:
        index = int(_field(rec, "index"))
        if not 0 <= index < n:
            raise ConfigError(f"record index {index} is outside the dataset (size {n})")
        if index in seen:
            raise ConfigError(f"record index {index} appears twice")
        seen.add(index)
        label = int(_field(rec, "label"))
        if not 0 <= label < len(class_names):
            raise ConfigError(f"record label {label} has no class name ({len(class_names)} given)")
        item = dataset[index]
        img = _to_pil(item[0] if isinstance(item, tuple | list) else item, index)
        ow, oh = img.size
        if hw is not None and (hw[0], hw[1]) != (oh, ow):
            img = img.resize((hw[1], hw[0]), _RESAMPLE[resample])
        name = workspace_file_name(index, class_names[label])
        atomic_write(out / name, lambda f, img=img: img.save(f, format="PNG"))
        rows[name] = {
            "file": name,
            "index": index,
            "label": label,
            "class_name": str(class_names[label]),
            "pred": int(_field(rec, "pred")),
            "confidence": float(_field(rec, "confidence")),
            "width": img.size[0],
            "height": img.size[1],
            "orig_width": ow,
            "orig_height": oh,
        }

    ordered = sorted(rows.values(), key=lambda r: (int(r["index"]), r["file"]))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=INDEX_COLUMNS)
    writer.writeheader()
    writer.writerows(ordered)
    atomic_write_text(out / "index.csv", table.getvalue())
    atomic_write_text(out / "index.json", json.dumps(ordered, indent=1))
    return out


_INT_COLUMNS = ("index", "label", "pred", "width", "height", "orig_width", "orig_height")


def read_index(workspace: str | Path) -> dict[str, dict[str, Any]]:
    """Rows of ``index.csv`` keyed by image file stem, with numbers parsed.

    Args:
        workspace: The workspace folder.

    Returns:
        Image file stem -> row (``INDEX_COLUMNS``, numbers as int/float).

    Raises:
        DataError: A missing or malformed ``index.csv``.
    """
    path = Path(workspace) / "index.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(INDEX_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path} is missing columns {sorted(missing)}")
            raw_rows = list(reader)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    rows: dict[str, dict[str, Any]] = {}
    for line, raw in enumerate(raw_rows, 2):
        row: dict[str, Any] = dict(raw)
        try:
            for key in _INT_COLUMNS:
                row[key] = int(raw[key])
            row["confidence"] = float(raw["confidence"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{path} line {line}: {e}") from e
        rows[Path(row["file"]).stem] = row
    return rows
