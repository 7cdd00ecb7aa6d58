"""labelme JSON -> one foreground mask per dataset index, for Model Doctor's spatial term.

Why this module is strict: a mask given to the wrong image, or drawn from only some of the shapes,
silently teaches the model the wrong foreground. So:

* the dataset index comes from the workspace's ``index.csv`` (keyed by the stem of the image the
  shapes were drawn on, ``imagePath``, else the JSON's own stem); only without ``index.csv`` is a
  leading integer in the file name trusted;
* every shape counts (union), of every type labelme writes, rasterised by labelme's own
  ``shape_to_mask`` at the image size stored in the JSON (AI ``mask`` shapes are pasted at
  their top-left point, as labelme's ``shapes_to_label`` does);
* the stored size must equal the workspace image size, and a mask drawn on an enlarged workspace
  image is brought back to the dataset size by area average, keeping a dataset pixel when at
  least half of it was covered (``>= 0.5``); with a nearest-neighbour workspace at an integer
  factor that is exactly "at least half of the block";
* a shape that encloses no area (a polygon of collinear or repeated points, a rectangle of
  zero width or height, a circle of zero radius) is skipped: rasterised, it would become a line
  or a single pixel of "foreground";
* two JSON files that claim one image through ``imagePath`` (a copied file): the one named after
  the image is kept and the other skipped, naming both; if neither is, both are skipped;
* anything doubtful is skipped with a ``MaskWarning`` naming the file and reason, and counted.

Masks are written as ``{index:06d}.png`` (mode ``L``, 0 background, 255 foreground) plus
``masks.json``, each atomically (:mod:`md_plugin.files`: a failed write leaves no partial PNG);
existing masks are kept unless ``overwrite=True`` (an empty file, left by an older failed write,
is replaced).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, MDError
from ..files import atomic_write, atomic_write_text
from .workspace import read_index

__all__ = ["MaskReport", "MaskWarning", "labelme_to_masks", "mask_file_name"]

SUMMARY_FILE = "masks.json"
# PIL's default decompression-bomb limit (labelme switches PIL's own check off): a stored size
# above it is a corrupt value, and rasterising it would allocate gigabytes
MAX_PIXELS = 89_478_485
_OWN_JSON = {"index.json", SUMMARY_FILE}

# (min, max) number of points per shape type, checked here so a bad shape is skipped with a
# reason instead of reaching labelme's asserts (which ``python -O`` would strip).
_POINTS = {
    "polygon": (3, None),
    "rectangle": (2, 2),
    "circle": (2, 2),
    "line": (2, 2),
    "linestrip": (2, None),
    "point": (1, 1),
    "oriented_rectangle": (4, 4),
    "mask": (2, 2),
}
# shapes that stand for a region (a line, a linestrip or a point is thin by design)
_REGIONS = ("polygon", "rectangle", "circle", "oriented_rectangle")


class MaskWarning(UserWarning):
    """An annotation file or shape was skipped."""


@dataclass
class MaskReport:
    """What ``labelme_to_masks`` did: indices written, files and shapes skipped with reasons."""

    written: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_shapes: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """``"N masks written, M skipped"``."""
        return f"{len(self.written)} masks written, {len(self.skipped)} skipped"


class _Skip(Exception):
    """Reason a whole annotation file is skipped."""


def mask_file_name(index: int) -> str:
    """``000123.png``: the mask file of a dataset index.

    Args:
        index: The dataset index.

    Returns:
        The file name.
    """
    return f"{int(index):06d}.png"


def _labelme_utils() -> tuple[Callable[..., np.ndarray], Callable[[str], np.ndarray]]:
    """labelme is optional (``md-plugin[labelme]``) and slow to import: load it only here."""
    try:
        from labelme.utils import img_b64_to_arr, shape_to_mask
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "labelme":
            raise MDError("labelme is not installed: pip install 'md-plugin[labelme]'") from e
        raise MDError(f"labelme is installed but cannot be imported: {e}") from e
    except ImportError as e:
        raise MDError(f"labelme is installed but cannot be imported: {e}") from e
    return shape_to_mask, img_b64_to_arr


def _warn(report_list: list[tuple[str, str]], file: str, reason: str) -> None:
    report_list.append((file, reason))
    warnings.warn(f"{file}: {reason}", MaskWarning, stacklevel=3)


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _Skip(f"invalid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _Skip("not a labelme file (top level is not an object)")
    missing = [k for k in ("shapes", "imageHeight", "imageWidth") if k not in doc]
    if missing:
        raise _Skip(f"not a labelme file (missing {', '.join(missing)})")
    if not isinstance(doc["shapes"], list):
        raise _Skip("not a labelme file (shapes is not a list)")
    for key in ("imageHeight", "imageWidth"):
        v = doc[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _Skip(f"not a labelme file ({key}={v!r} is not a positive integer)")
    if doc["imageHeight"] * doc["imageWidth"] > MAX_PIXELS:
        raise _Skip(
            f"imageHeight x imageWidth = {doc['imageHeight']}x{doc['imageWidth']} is over the "
            f"{MAX_PIXELS} pixel limit (a corrupt size, not a real image)"
        )
    return doc


def _image_stem(path: Path, doc: dict[str, Any]) -> str:
    """The image the shapes were drawn on; labelme may store a Windows or relative path."""
    image_path = doc.get("imagePath")
    if isinstance(image_path, str) and image_path.strip():
        return Path(image_path.replace("\\", "/")).stem
    return path.stem


def _resolve(
    path: Path, doc: dict[str, Any], rows: dict[str, dict[str, Any]] | None
) -> tuple[int, tuple[int, int] | None]:
    """Dataset index and, with a workspace index, the dataset (height, width) to return to."""
    h, w = doc["imageHeight"], doc["imageWidth"]
    stem = _image_stem(path, doc)
    if rows is None:
        m = re.match(r"\d+", stem)
        if not m:
            raise _Skip(f"no index.csv and {stem!r} does not start with a dataset index")
        return int(m.group()), None
    row = rows.get(stem)
    if row is None:
        raise _Skip(f"image {stem!r} is not listed in the workspace index.csv")
    if (h, w) != (row["height"], row["width"]):
        raise _Skip(
            f"imageHeight x imageWidth is {h}x{w} but the workspace image {row['file']} is "
            f"{row['height']}x{row['width']}"
        )
    return row["index"], (row["orig_height"], row["orig_width"])


def _points(shape: dict[str, Any], hw: tuple[int, int]) -> list[list[float]]:
    """The shape's points as floats; NaN/inf or points far off the image are refused.

    A point may lie outside the image (labelme lets one drag a vertex past the border), but not
    by more than the image's own size: beyond that the number is a corrupt value (1e300 would
    wrap around inside the rasteriser and paint a garbage mask).
    """
    pts = shape.get("points")
    if not isinstance(pts, list) or not all(
        isinstance(p, list | tuple)
        and len(p) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
        for p in pts
    ):
        raise ValueError("points must be a list of [x, y] numbers")
    try:
        out = [[float(x), float(y)] for x, y in pts]
    except OverflowError:  # a JSON integer beyond float range
        raise ValueError("a point coordinate is too large") from None
    h, w = hw
    for x, y in out:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"point ({x}, {y}) is not finite")
        if not (-w <= x <= 2 * w and -h <= y <= 2 * h):
            raise ValueError(f"point ({x:g}, {y:g}) is far outside the {h}x{w} image")
    return out


def _zero_area(kind: str, pts: list[list[float]]) -> str | None:
    """Why a region shape encloses no area, or None when it does."""
    p = np.asarray(pts, dtype=np.float64)
    if kind == "rectangle":
        (x0, y0), (x1, y1) = p
        return "a rectangle of zero width or height" if x0 == x1 or y0 == y1 else None
    if kind == "circle":
        return "a circle of zero radius" if (p[0] == p[1]).all() else None
    d = p - p[0]
    scale = float(np.abs(d).max())
    if scale == 0.0:
        return "all its points are one point"
    far = d[np.abs(d).sum(1).argmax()]
    cross = far[0] * d[:, 1] - far[1] * d[:, 0]  # twice the area of (p0, far, p_i)
    if float(np.abs(cross).max()) <= 1e-9 * scale * scale:
        return "all its points lie on one line"
    return None


def _paste_mask(
    hw: tuple[int, int], shape: dict[str, Any], pts: list[list[float]], b64: Callable
) -> np.ndarray:
    """labelme's AI ``mask`` shape: a base64 PNG whose top-left corner is the first point."""
    data = shape.get("mask")
    if not isinstance(data, str):
        raise ValueError("mask shape without a base64 'mask'")
    patch = np.asarray(b64(data)).astype(bool)
    if patch.ndim == 3:
        patch = patch.any(axis=2)
    out = np.zeros(hw, dtype=bool)
    x0, y0 = (int(v) for v in pts[0])
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + patch.shape[0], hw[0]), min(x0 + patch.shape[1], hw[1])
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = patch[ys - y0 : ye - y0, xs - x0 : xe - x0]
    return out


def _rasterise(
    path: Path,
    doc: dict[str, Any],
    foreground: set[str] | None,
    report: MaskReport,
    utils: tuple[Callable, Callable],
) -> np.ndarray:
    """Union of every usable shape; bad shapes are warned about and left out."""
    shape_to_mask, b64 = utils
    hw = (doc["imageHeight"], doc["imageWidth"])
    mask = np.zeros(hw, dtype=bool)
    used = 0
    for i, shape in enumerate(doc["shapes"]):
        where = f"{path.name} shape {i}"
        if not isinstance(shape, dict):
            _warn(report.skipped_shapes, where, "not an object")
            continue
        label = shape.get("label")
        if foreground is not None and label not in foreground:
            continue
        kind = shape.get("shape_type") or "polygon"  # labelme < 3 wrote no shape_type
        where = f"{where} ({kind} {label!r})"
        if kind not in _POINTS:
            _warn(report.skipped_shapes, where, f"unsupported shape type {kind!r}")
            continue
        try:
            pts = _points(shape, hw)
        except ValueError as e:
            _warn(report.skipped_shapes, where, str(e))
            continue
        lo, hi = _POINTS[kind]
        if len(pts) < lo or (hi is not None and len(pts) > hi):
            need = f"{lo}" if lo == hi else f"at least {lo}"
            _warn(report.skipped_shapes, where, f"has {len(pts)} points, needs {need}")
            continue
        flat = _zero_area(kind, pts) if kind in _REGIONS else None
        if flat:
            _warn(report.skipped_shapes, where, f"encloses no area ({flat})")
            continue
        try:
            if kind == "mask":
                mask |= _paste_mask(hw, shape, pts, b64)
            else:
                mask |= shape_to_mask(hw, pts, kind)
        except (ValueError, TypeError, OSError) as e:
            _warn(report.skipped_shapes, where, f"cannot rasterise ({e})")
            continue
        used += 1
    if used == 0:
        which = f" with a label in {sorted(foreground)}" if foreground is not None else ""
        raise _Skip(f"no valid shape{which}")
    if not mask.any():
        raise _Skip("shapes cover no pixel of the image")
    return mask


def _to_dataset_size(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Area average (PIL BOX = exact pixel coverage) then keep pixels covered >= 0.5."""
    if mask.shape == hw:
        return mask
    img = Image.fromarray(mask.astype(np.float32))
    cover = np.asarray(img.resize((hw[1], hw[0]), Image.Resampling.BOX))
    return cover >= 0.5


def _read_summary(out: Path) -> dict[str, Any]:
    path = out / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        with open(path) as f:
            masks = json.load(f)["masks"]
        if not isinstance(masks, dict):
            raise TypeError("masks is not an object")
        return masks
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a masks summary written by md-plugin: {e}") from e


def _claims(docs: dict[Path, dict[str, Any]]) -> dict[Path, str]:
    """Files to skip because another file claims the same image through ``imagePath``.

    labelme saves ``<image stem>.json``, so of several files that claim one image the one named
    after it is its own and kept; a copy under another name is skipped. When none is named
    after the image, there is no telling which holds the right shapes, and all are skipped.
    Every message names all claimants.
    """
    by_image: dict[str, list[Path]] = {}
    for path, doc in docs.items():
        by_image.setdefault(_image_stem(path, doc), []).append(path)
    skip: dict[Path, str] = {}
    for stem, paths in by_image.items():
        if len(paths) < 2:
            continue
        names = " and ".join(p.name for p in paths)
        own = [p for p in paths if p.stem == stem]
        for p in paths:
            if len(own) == 1 and p != own[0]:
                skip[p] = (
                    f"{names} claim one image {stem!r} through imagePath; {own[0].name} is "
                    "named after it and kept"
                )
            elif not own:
                skip[p] = (
                    f"{names} claim one image {stem!r} through imagePath and none is named "
                    "after it: all skipped (fix imagePath in the copies)"
                )
    return skip


def _write_mask(target: Path, mask: np.ndarray) -> None:
    """The PNG (mode L, 0/255), written atomically: a failed write leaves no partial file."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    atomic_write(target, lambda f: image.save(f, format="PNG"))


def _check_folders(ann: Path, out: Path, dataset_size: int | None) -> None:
    """The annotation and mask folders and the dataset size, before anything is read."""
    if not ann.is_dir():
        raise DataError(f"annotation folder not found: {ann}")
    if out.exists() and not out.is_dir():
        raise DataError(f"mask folder {out} exists and is not a folder")
    if out.resolve() == ann.resolve():
        raise ConfigError(
            "write masks to a folder other than the labelme workspace "
            "(labelme would list the mask images as images to annotate)"
        )
    if dataset_size is not None and dataset_size <= 0:
        raise ConfigError(f"dataset_size must be positive, got {dataset_size}")


def _annotation_files(ann: Path) -> list[Path]:
    """The labelme JSON files in name order (not the workspace's own files); none: a warning."""
    files = [p for p in sorted(ann.glob("*.json")) if p.name not in _OWN_JSON and p.is_file()]
    if not files:
        warnings.warn(
            f"{ann} holds no labelme JSON file: no mask written (annotate the images with "
            "labelme first; it saves <image>.json beside each image)",
            MaskWarning,
            stacklevel=3,
        )
    return files


def _load_documents(files: list[Path], report: MaskReport) -> dict[Path, dict[str, Any]]:
    """Every readable labelme document, without its embedded image; the others skipped."""
    docs: dict[Path, dict[str, Any]] = {}
    for path in files:
        try:
            docs[path] = _load(path)
        except _Skip as e:
            _warn(report.skipped, path.name, str(e))
        else:
            docs[path].pop("imageData", None)  # the embedded image is not used: free it
    return docs


@dataclass
class _Conversion:
    """One ``labelme_to_masks`` call: its settings, and the indices converted so far."""

    out: Path
    rows: dict[str, dict[str, Any]] | None
    dataset_size: int | None
    overwrite: bool
    foreground: set[str] | None
    utils: tuple[Callable, Callable]
    report: MaskReport
    done: dict[int, str] = field(default_factory=dict)

    def mask_of(self, path: Path, doc: dict[str, Any]) -> tuple[int, Path, np.ndarray]:
        """(dataset index, mask file, mask at the dataset size) of one document, or
        :class:`_Skip` with the reason."""
        index, dataset_hw = _resolve(path, doc, self.rows)
        if self.dataset_size is not None and index >= self.dataset_size:
            raise _Skip(f"index {index} is outside the dataset (size {self.dataset_size})")
        if index in self.done:
            raise _Skip(f"index {index} was already converted from {self.done[index]}")
        target = self.out / mask_file_name(index)
        if target.exists() and not self.overwrite and target.stat().st_size > 0:
            raise _Skip(f"{target.name} already exists (pass overwrite to replace it)")
        mask = _rasterise(path, doc, self.foreground, self.report, self.utils)
        if dataset_hw is not None:
            mask = _to_dataset_size(mask, dataset_hw)
            if not mask.any():
                raise _Skip("mask vanishes at the dataset image size")
        return index, target, mask


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``masks.json``: every mask of the folder, by index."""
    ordered = dict(sorted(summary.items(), key=lambda kv: int(kv[0])))
    atomic_write_text(out / SUMMARY_FILE, json.dumps({"version": 1, "masks": ordered}, indent=1))


def labelme_to_masks(
    annotations_dir: str | Path,
    out_dir: str | Path,
    *,
    dataset_size: int | None = None,
    overwrite: bool = False,
    foreground_labels: Iterable[str] | None = None,
) -> MaskReport:
    """Convert every labelme JSON in ``annotations_dir`` into ``out_dir/{index:06d}.png``.

    Files are processed in name order; a second file for an index already converted in this run
    is skipped. See the module docstring for the mapping, resize and skip rules.

    Args:
        annotations_dir: The labelme folder (a workspace with ``index.csv``, or JSON files whose
            image names start with the dataset index).
        out_dir: Where the masks go (not the annotation folder).
        dataset_size: Refuse indices at or beyond it.
        overwrite: Replace masks that already exist.
        foreground_labels: Keep only shapes with these labels (default: all shapes).

    Returns:
        A :class:`MaskReport` of the indices written and the files and shapes skipped.

    Raises:
        DataError: A missing annotation folder or a bad ``index.csv``/``masks.json``.
        ConfigError: ``out_dir`` is the annotation folder, or a bad ``dataset_size``.
        MDError: labelme is missing, or a mask cannot be written.
    """
    utils = _labelme_utils()
    ann = Path(annotations_dir).expanduser()
    out = Path(out_dir).expanduser()
    _check_folders(ann, out, dataset_size)
    job = _Conversion(
        out=out,
        rows=read_index(ann) if (ann / "index.csv").is_file() else None,
        dataset_size=dataset_size,
        overwrite=overwrite,
        foreground=set(foreground_labels) if foreground_labels is not None else None,
        utils=utils,
        report=MaskReport(),
    )
    files = _annotation_files(ann)
    out.mkdir(parents=True, exist_ok=True)
    summary = _read_summary(out)
    docs = _load_documents(files, job.report)
    claimed = _claims(docs)
    for path, doc in docs.items():
        try:
            if path in claimed:
                raise _Skip(claimed[path])
            index, target, mask = job.mask_of(path, doc)
        except _Skip as e:
            _warn(job.report.skipped, path.name, str(e))
            continue
        _write_mask(target, mask)
        job.done[index] = path.name
        job.report.written.append(index)
        summary[str(index)] = {
            "file": target.name,
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "foreground_pixels": int(mask.sum()),
            "source": path.name,
        }
    if job.report.written:
        _write_summary(out, summary)
    return job.report
