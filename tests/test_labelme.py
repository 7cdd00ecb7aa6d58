"""labelme round trip: workspace -> labelme JSON -> masks keyed by dataset index -> loaded masks.

Pixel counts are worked out by hand from PIL's fill rules, which labelme's ``shape_to_mask``
uses: rectangles and polygons include their boundary pixels, so a rectangle from (x0, y0) to
(x1, y1) covers (x1 - x0 + 1) * (y1 - y0 + 1) pixels.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from md_plugin.annotate import (
    MaskStoreWarning,
    MaskWarning,
    labelme_to_masks,
    load_masks,
    write_workspace,
)
from md_plugin.data.cifar import CIFAR10
from md_plugin.data.fixtures import write_cifar
from md_plugin.errors import DataError, MDError

pytest.importorskip("labelme")


def shape(points, kind="polygon", label="fg"):
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def write_json(path: Path, shapes, height: int, width: int, image_path: str | None = None):
    doc = {
        "version": "6.3.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path if image_path is not None else path.with_suffix(".png").name,
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }
    path.write_text(json.dumps(doc))
    return path


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        arr = np.asarray(img)
    assert set(np.unique(arr)) <= {0, 255}
    return arr == 255


def tiny_dataset(n: int = 6, size: int = 8):
    """A list dataset of (PIL image, label): what write_workspace reads via dataset[i]."""
    return [(Image.new("RGB", (size, size), (i * 10, 0, 0)), i % 2) for i in range(n)]


# --- rasterisation --------------------------------------------------------------------------


def test_all_shape_types_in_one_file_exact_pixels(tmp_path):
    ann, out = tmp_path / "ann", tmp_path / "masks"
    ann.mkdir()
    write_json(
        ann / "000003.json",
        [
            shape([[2, 3], [11, 8]], "rectangle"),  # x 2..11, y 3..8: 10 * 6 = 60
            shape([[20, 2], [26, 2], [20, 8]]),  # right triangle, legs 6: 7+6+...+1 = 28
            shape([[20, 20], [22, 20]], "circle"),  # r=2: 5x5 box minus 4 corners = 21
            shape([[30, 30], [35, 30], [35, 33], [30, 33]], "oriented_rectangle"),  # 6 * 4 = 24
        ],
        40,
        40,
    )
    report = labelme_to_masks(ann, out)
    assert report.written == [3] and report.skipped == []
    m = read_mask(out / "000003.png")
    assert m.shape == (40, 40)
    assert m.sum() == 60 + 28 + 21 + 24
    assert m[3:9, 2:12].all() and m[3:9, 2:12].sum() == 60
    assert m[2:9, 20:27].sum() == 28 and m[8, 20] and not m[8, 21]
    assert m[18:23, 18:23].sum() == 21 and not m[18, 18] and m[18, 19]
    assert m[30:34, 30:36].all()
    summary = json.loads((out / "masks.json").read_text())["masks"]
    assert summary["3"]["file"] == "000003.png"
    assert (summary["3"]["height"], summary["3"]["width"]) == (40, 40)
    assert summary["3"]["foreground_pixels"] == 133
    assert report.summary() == "1 masks written, 0 skipped"


def test_union_of_overlapping_shapes_and_label_filter(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    write_json(
        ann / "7.json",
        [
            shape([[0, 0], [9, 9]], "rectangle"),  # 100
            shape([[5, 5], [14, 14]], "rectangle"),  # 100, overlaps 5..9 x 5..9 = 25
            shape([[20, 20], [23, 21]], "rectangle", label="shadow"),  # 4 * 2 = 8
        ],
        30,
        30,
    )
    labelme_to_masks(ann, tmp_path / "all")
    labelme_to_masks(ann, tmp_path / "fg", foreground_labels={"fg"})
    assert read_mask(tmp_path / "all" / "000007.png").sum() == 100 + 100 - 25 + 8
    assert read_mask(tmp_path / "fg" / "000007.png").sum() == 175
    with pytest.warns(MaskWarning, match="7.json: no valid shape with a label in"):
        report = labelme_to_masks(ann, tmp_path / "none", foreground_labels={"cat"})
    assert report.written == [] and len(report.skipped) == 1


def test_ai_mask_shape_is_pasted_at_its_top_left_point(tmp_path):
    patch = np.zeros((3, 4), dtype=np.uint8)
    patch[0, :] = 1  # 4 pixels
    patch[1:, 0] = 1  # 2 pixels
    buf = io.BytesIO()
    Image.fromarray(patch * 255).save(buf, format="PNG")
    s = shape([[10, 5], [13, 7]], "mask")
    s["mask"] = base64.b64encode(buf.getvalue()).decode()
    ann = tmp_path / "ann"
    ann.mkdir()
    write_json(ann / "000001.json", [s], 20, 20)
    labelme_to_masks(ann, tmp_path / "m")
    m = read_mask(tmp_path / "m" / "000001.png")
    assert m.sum() == 6
    assert m[5, 10:14].all() and m[6, 10] and m[7, 10]


def test_missing_labelme_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "labelme", None)
    monkeypatch.setitem(sys.modules, "labelme.utils", None)
    with pytest.raises(
        MDError, match=r"labelme is not installed: pip install 'md-plugin\[labelme\]'"
    ):
        labelme_to_masks(tmp_path, tmp_path / "m")


# --- bad input is skipped, warned about and counted ---------------------------------------------


def test_bad_inputs_skipped_with_warnings(tmp_path):
    ws = tmp_path / "ws"
    ds = tiny_dataset(6, size=8)
    records = [{"index": i, "label": i % 2, "pred": 0, "confidence": 0.7} for i in (0, 1, 2, 3)]
    write_workspace(ws, records, ds, ["even", "odd"], size=16)
    rect = [shape([[0, 0], [3, 3]], "rectangle")]  # 16 px at 16x16 -> 2x2 = 4 px at 8x8
    # good, drawn on the workspace image; imagePath in Windows form as labelme may write it
    write_json(ws / "000000_even.json", rect, 16, 16, image_path="..\\ws\\000000_even.png")
    # one good shape and one 2-point polygon: shape skipped, image kept
    write_json(ws / "000001_odd.json", rect + [shape([[5, 5], [9, 9]])], 16, 16)
    # only a 2-point polygon: image skipped
    write_json(ws / "000002_even.json", [shape([[5, 5], [9, 9]])], 16, 16)
    # drawn at the dataset size, not the workspace size
    write_json(ws / "000003_odd.json", rect, 8, 8)
    (ws / "broken.json").write_text('{"shapes": [')
    (ws / "other.json").write_text(json.dumps({"shapes": [], "imageWidth": 16}))
    write_json(ws / "000005_odd.json", rect, 16, 16)  # no such workspace image
    out = tmp_path / "masks"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = labelme_to_masks(ws, out, dataset_size=len(ds))
    assert report.written == [0, 1]
    reasons = dict(report.skipped)
    assert set(reasons) == {
        "000002_even.json", "000003_odd.json", "000005_odd.json", "broken.json", "other.json",
    }  # fmt: skip
    assert "no valid shape" in reasons["000002_even.json"]
    assert "8x8" in reasons["000003_odd.json"] and "16x16" in reasons["000003_odd.json"]
    assert "not listed" in reasons["000005_odd.json"]
    assert reasons["broken.json"].startswith("invalid JSON")
    assert "missing imageHeight" in reasons["other.json"]
    assert [f for f, _ in report.skipped_shapes] == [
        "000001_odd.json shape 1 (polygon 'fg')",
        "000002_even.json shape 0 (polygon 'fg')",
    ]
    texts = [str(w.message) for w in caught if issubclass(w.category, MaskWarning)]
    assert len(texts) == 5 + 2
    for name in reasons:
        assert any(t.startswith(name + ":") for t in texts)
    assert report.summary() == "2 masks written, 5 skipped"
    for i in (0, 1):
        m = read_mask(out / f"{i:06d}.png")
        assert m.shape == (8, 8) and m.sum() == 4 and m[:2, :2].all()
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "masks.json"]


def test_index_outside_dataset_without_index_csv(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    rect = [shape([[0, 0], [1, 1]], "rectangle")]
    write_json(ann / "000009_cat.json", rect, 4, 4)
    write_json(ann / "000010_cat.json", rect, 4, 4)
    write_json(ann / "cat.json", rect, 4, 4)
    with pytest.warns(MaskWarning):
        report = labelme_to_masks(ann, tmp_path / "m", dataset_size=10)
    assert report.written == [9]
    reasons = dict(report.skipped)
    assert "outside the dataset (size 10)" in reasons["000010_cat.json"]
    assert "does not start with a dataset index" in reasons["cat.json"]


def test_existing_masks_kept_unless_overwrite(tmp_path):
    ann, out = tmp_path / "ann", tmp_path / "m"
    ann.mkdir()
    write_json(ann / "000004.json", [shape([[0, 0], [1, 1]], "rectangle")], 10, 10)  # 4 px
    assert labelme_to_masks(ann, out).written == [4]
    before = (out / "000004.png").read_bytes()
    write_json(ann / "000004.json", [shape([[0, 0], [2, 2]], "rectangle")], 10, 10)  # 9 px
    with pytest.warns(MaskWarning, match="000004.png already exists"):
        report = labelme_to_masks(ann, out)
    assert report.written == [] and report.skipped[0][0] == "000004.json"
    assert (out / "000004.png").read_bytes() == before
    report = labelme_to_masks(ann, out, overwrite=True)
    assert report.written == [4]
    assert read_mask(out / "000004.png").sum() == 9
    assert json.loads((out / "masks.json").read_text())["masks"]["4"]["foreground_pixels"] == 9


def test_two_files_for_one_index_second_is_skipped(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    write_json(ann / "5_a.json", [shape([[0, 0], [1, 1]], "rectangle")], 4, 4)
    write_json(ann / "5_b.json", [shape([[0, 0], [3, 3]], "rectangle")], 4, 4)
    with pytest.warns(MaskWarning, match="index 5 was already converted from 5_a.json"):
        report = labelme_to_masks(ann, tmp_path / "m")
    assert report.written == [5] and read_mask(tmp_path / "m" / "000005.png").sum() == 4


def test_zero_area_shapes_are_skipped_with_a_reason(tmp_path):
    """Issue 19 item 7: a region that encloses nothing is not a 1-pixel or line mask."""
    ann, out = tmp_path / "ann", tmp_path / "m"
    ann.mkdir()
    flat = [
        shape([[1, 1], [4, 4], [7, 7]]),  # collinear polygon
        shape([[2, 2], [2, 2], [2, 2]]),  # repeated points
        shape([[1, 1], [1, 6]], "rectangle"),  # zero width
        shape([[5, 5], [5, 5]], "circle"),  # zero radius
        shape([[0, 9], [3, 9], [6, 9], [9, 9]], "oriented_rectangle"),  # on one line
    ]
    write_json(ann / "000001.json", [*flat, shape([[0, 0], [1, 1]], "rectangle")], 10, 10)
    write_json(ann / "000002.json", flat, 10, 10)
    with pytest.warns(MaskWarning) as caught:
        report = labelme_to_masks(ann, out)
    assert sum("encloses no area" in str(w.message) for w in caught) == 10
    assert report.written == [1] and read_mask(out / "000001.png").sum() == 4
    reasons = [r for f, r in report.skipped_shapes if f.startswith("000001.json")]
    assert reasons == [
        "encloses no area (all its points lie on one line)",
        "encloses no area (all its points are one point)",
        "encloses no area (a rectangle of zero width or height)",
        "encloses no area (a circle of zero radius)",
        "encloses no area (all its points lie on one line)",
    ]
    assert dict(report.skipped)["000002.json"] == "no valid shape"
    # thin shapes by design (line, point) and a tilted sliver still count
    write_json(ann / "000003.json", [shape([[0, 0], [9, 0]], "line"),
                                     shape([[0, 0], [9, 1], [0, 1.5]])], 10, 10)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert labelme_to_masks(ann, out).written == [3]


def test_two_files_claiming_one_image_keep_its_own(tmp_path):
    """Issue 19 item 7: a copied JSON (imagePath still the other image) never wins by sorting
    first; the message names both files. With no file named after the image, both are out."""
    ann, out = tmp_path / "ann", tmp_path / "m"
    ann.mkdir()
    write_json(ann / "000003_a.json", [shape([[0, 0], [1, 1]], "rectangle")], 8, 8)
    write_json(ann / "000002_copy.json", [shape([[0, 0], [3, 3]], "rectangle")], 8, 8,
               image_path="000003_a.png")  # fmt: skip
    write_json(ann / "x1.json", [shape([[0, 0], [2, 2]], "rectangle")], 8, 8,
               image_path="000007_c.png")  # fmt: skip
    write_json(ann / "x2.json", [shape([[0, 0], [2, 2]], "rectangle")], 8, 8,
               image_path="000007_c.png")  # fmt: skip
    with pytest.warns(MaskWarning) as caught:
        report = labelme_to_masks(ann, out)
    assert report.written == [3] and read_mask(out / "000003.png").sum() == 4
    reasons = dict(report.skipped)
    assert reasons["000002_copy.json"] == (
        "000002_copy.json and 000003_a.json claim one image '000003_a' through imagePath; "
        "000003_a.json is named after it and kept"
    )
    for name in ("x1.json", "x2.json"):
        assert reasons[name].startswith("x1.json and x2.json claim one image '000007_c'")
        assert "none is named after it" in reasons[name]
    assert all("\n" not in str(w.message) for w in caught)


def test_an_empty_annotation_folder_warns(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "index.json").write_text("[]")  # a workspace's own file is not an annotation
    with pytest.warns(MaskWarning, match="holds no labelme JSON file"):
        report = labelme_to_masks(ann, tmp_path / "m")
    assert report.written == [] and report.skipped == []


def test_a_failed_mask_write_leaves_no_partial_png(tmp_path, monkeypatch):
    """A full disk while a PNG is written: one line, no partial or temporary file; a 0-byte
    mask left by an older failed write is replaced on the rerun, not kept as "existing"."""
    import errno

    from PIL import Image as PILImage

    ann, out = tmp_path / "ann", tmp_path / "m"
    ann.mkdir()
    write_json(ann / "000004.json", [shape([[0, 0], [1, 1]], "rectangle")], 10, 10)
    real = PILImage.SAVE["PNG"]

    def full(im, fp, filename):
        fp.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(PILImage.SAVE, "PNG", full)
    with pytest.raises(MDError) as e:
        labelme_to_masks(ann, out)
    assert "\n" not in str(e.value) and "000004.png" in str(e.value)
    assert "disk full" in str(e.value)
    assert list(out.iterdir()) == []
    monkeypatch.setitem(PILImage.SAVE, "PNG", real)
    (out / "000004.png").write_bytes(b"")  # what a non-atomic write left behind
    assert labelme_to_masks(ann, out).written == [4]
    assert read_mask(out / "000004.png").sum() == 4


# --- workspace ------------------------------------------------------------------------------


def test_workspace_refuses_non_empty_and_keeps_annotations(tmp_path):
    ds = tiny_dataset(4, size=8)
    rec = [{"index": 2, "label": 0, "pred": 1, "confidence": 0.65}]
    ws = write_workspace(tmp_path / "ws", rec, ds, ["even", "odd"])
    write_json(ws / "000002_even.json", [shape([[0, 0], [1, 1]], "rectangle")], 8, 8)
    with pytest.raises(MDError, match="not empty"):
        write_workspace(ws, rec, ds, ["even", "odd"])
    rec2 = [{"index": 3, "label": 1, "pred": 1, "confidence": 0.61}]
    write_workspace(ws, rec2, ds, ["even", "odd"], overwrite=True)
    assert (ws / "000002_even.json").is_file()
    with open(ws / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["000002_even.png", "000003_odd.png"]
    assert labelme_to_masks(ws, tmp_path / "m").written == [2]


def test_cifar_workspace_round_trip(tmp_path):
    write_cifar(tmp_path / "data", train_per_class=2)
    ds = CIFAR10(tmp_path / "data", train=True)
    picks = [5, 13, 17]
    records = [
        {"index": i, "label": ds.targets[i], "pred": 0, "confidence": 0.6 + i / 100} for i in picks
    ]
    ws = write_workspace(tmp_path / "ws", records, ds, ds.classes, size=128)

    names = {i: f"{i:06d}_{ds.classes[ds.targets[i]]}.png" for i in picks}
    assert sorted(p.name for p in ws.iterdir()) == sorted(
        [*names.values(), "index.csv", "index.json"]
    )
    with open(ws / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "file", "index", "label", "class_name", "pred", "confidence",
        "width", "height", "orig_width", "orig_height",
    ]  # fmt: skip
    assert [(r["file"], int(r["index"]), int(r["label"])) for r in rows] == [
        (names[i], i, ds.targets[i]) for i in picks
    ]
    assert {(r["width"], r["height"], r["orig_width"], r["orig_height"]) for r in rows} == {
        ("128", "128", "32", "32")
    }
    assert json.loads((ws / "index.json").read_text()) == [
        {**r, **{k: int(r[k]) for k in ("index", "label", "pred", "width", "height",
                                         "orig_width", "orig_height")},
         "confidence": float(r["confidence"])}
        for r in rows
    ]  # fmt: skip
    # nearest upscaling: every dataset pixel is an exact 4x4 block
    big = np.asarray(Image.open(ws / names[13]))
    small = np.asarray(ds[13][0])
    assert big.shape == (128, 128, 3)
    assert np.array_equal(big[::4, ::4], small) and np.array_equal(big[3::4, 3::4], small)

    # save as labelme itself does, with the image embedded (labelme checks its size)
    from labelme import LabelFile

    def block(rows: slice, cols: slice) -> np.ndarray:
        m = np.zeros((32, 32), dtype=bool)
        m[rows, cols] = True
        return m

    # workspace pixels p map to dataset pixel p // 4 (4x4 blocks)
    squares = {
        # 40..71 = blocks 10..17 exactly: 8 * 8 = 64
        5: ([[40, 40], [71, 71]], block(slice(10, 18), slice(10, 18))),
        # 40..73: blocks 10..17 full; row/column 18 blocks half covered (0.5, kept) but the
        # corner block (18, 18) only 2x2 of 4x4 (0.25, dropped): 64 + 8 + 8 = 80
        13: (
            [[40, 40], [73, 73]],
            block(slice(10, 19), slice(10, 18)) | block(slice(10, 18), slice(10, 19)),
        ),
        # 40..72: row/column 18 blocks a quarter covered (72 only): dropped, 64
        17: ([[40, 40], [72, 72]], block(slice(10, 18), slice(10, 18))),
    }
    for i, (pts, _) in squares.items():
        image = ws / names[i]
        LabelFile().save(
            filename=str(image.with_suffix(".json")),
            shapes=[shape(pts, "rectangle", label=ds.classes[ds.targets[i]])],
            image_path=image.name,
            image_height=128,
            image_width=128,
            image_data=LabelFile.load_image_file(str(image)),
        )
    report = labelme_to_masks(ws, tmp_path / "masks", dataset_size=len(ds))
    assert report.written == picks and report.skipped == []

    masks = load_masks(tmp_path / "masks", dataset_size=len(ds), image_size=(32, 32))
    assert sorted(masks) == picks
    assert [int(masks[i].sum()) for i in picks] == [64, 80, 64]
    for i, (_, expected) in squares.items():
        assert masks[i].shape == (32, 32) and masks[i].dtype == bool
        assert np.array_equal(masks[i], expected)


# --- mask store -----------------------------------------------------------------------------


def test_load_masks_skips_out_of_range_and_wrong_size(tmp_path):
    with pytest.raises(DataError, match="mask folder not found"):
        load_masks(tmp_path / "nope")
    d = tmp_path / "m"
    d.mkdir()
    good = np.zeros((4, 4), dtype=np.uint8)
    good[1, 1:3] = 255
    Image.fromarray(good).save(d / "000001.png")
    Image.fromarray(good).save(d / "000012.png")  # index out of range
    Image.fromarray(np.zeros((5, 4), dtype=np.uint8)).save(d / "000002.png")  # wrong size
    (d / "masks.json").write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = load_masks(d, dataset_size=10, image_size=(4, 4))
    assert list(masks) == [1]
    assert masks[1].sum() == 2 and masks[1][1, 1] and masks[1][1, 2]
    texts = sorted(str(w.message) for w in caught if issubclass(w.category, MaskStoreWarning))
    assert len(texts) == 2
    assert texts[0].startswith("000002.png: mask is 5x4, images are 4x4")
    assert texts[1].startswith("000012.png: index 12 is outside the dataset")
    assert sorted(load_masks(d)) == [1, 2, 12]


def test_masks_of_a_mixed_size_image_folder_are_checked_against_each_image(tmp_path):
    """Issue 13 item 6: a correct mask of an image whose size differs from image #0 is kept,
    and a mask with image #0's size given to a differently sized image is skipped."""
    from torchvision.datasets import ImageFolder

    from md_plugin.train.task_phase import image_hw as _image_hw

    sizes = {"a.png": (8, 8), "b.png": (12, 10), "c.png": (12, 10)}  # (H, W)
    (tmp_path / "data" / "cls").mkdir(parents=True)
    for name, (h, w) in sizes.items():
        Image.new("RGB", (w, h)).save(tmp_path / "data" / "cls" / name)
    ds = ImageFolder(str(tmp_path / "data"))
    assert [_image_hw(ds, i) for i in range(3)] == [(8, 8), (12, 10), (12, 10)]
    d = tmp_path / "masks"
    d.mkdir()
    fg = {0: np.zeros((8, 8), np.uint8), 1: np.zeros((12, 10), np.uint8)}
    fg[0][2:5, 2:5] = 255
    fg[1][1:4, 3:9] = 255
    for i, arr in fg.items():
        Image.fromarray(arr).save(d / f"{i:06d}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "000002.png")  # image #0's size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = load_masks(d, dataset_size=3, image_size=lambda i: _image_hw(ds, i))
    assert sorted(masks) == [0, 1]
    assert masks[1].shape == (12, 10) and int(masks[1].sum()) == 18
    assert int(masks[0].sum()) == 9
    assert len(caught) == 1 and "images are 12x10" in str(caught[0].message)
