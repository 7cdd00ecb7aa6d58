"""--class-map, --class-cap and --val-from-train: class subsets, caps, stratified hold-outs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from md_plugin.data.class_map import (
    apply_class_cap,
    apply_class_map,
    cap_indices,
    load_class_map,
    parse_class_cap,
)
from md_plugin.data.datasets import create_dataset, create_datasets, get_targets
from md_plugin.data.fixtures import CIFAR10_CLASSES, write_cifar
from md_plugin.data.split import parse_count_or_fraction, stratified_split
from md_plugin.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cifar_labelled(tmp_path_factory):
    """CIFAR-10 fixture whose pixel value encodes the image's position: (train, test) roots."""
    root = tmp_path_factory.mktemp("cifar_idx")

    def pixels(labels, rng):
        # every image is constant: channel 0 = label * 20, channels 1, 2 = running counter
        n = len(labels)
        counter = pixels.count + np.arange(n)
        pixels.count += n
        img = np.zeros((n, 3, 32, 32), np.uint8)
        img[:, 0] = (labels * 20)[:, None, None]
        img[:, 1] = (counter // 256)[:, None, None]
        img[:, 2] = (counter % 256)[:, None, None]
        return img.reshape(n, 3072)

    pixels.count = 0
    write_cifar(root, "cifar10", train_per_class=30, test_per_class=10, pixels=pixels)
    return root


def _label_of_pixel(img) -> int:
    return int(np.asarray(img)[0, 0, 0]) // 20


# ---- stratified_split -----------------------------------------------------------------------


def test_stratified_split_counts_by_hand():
    # 60 / 30 / 10 images, hold out 10 -> 6 / 3 / 1 exactly
    t = np.array([0] * 60 + [1] * 30 + [2] * 10)
    keep, held = stratified_split(t, 10, seed=3)
    assert np.bincount(t[held]).tolist() == [6, 3, 1]
    assert len(keep) == 90 and len(np.intersect1d(keep, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))
    assert np.all(np.diff(held) > 0) and np.all(np.diff(keep) > 0)
    # a fraction: 20% of each class
    _, held = stratified_split(t, 0.2, seed=3)
    assert np.bincount(t[held]).tolist() == [12, 6, 2]


def test_stratified_split_largest_remainder_and_minimum_one():
    # quotas 7 * (5, 3, 2) / 10 = 3.5, 2.1, 1.4 -> floors 3, 2, 1 (6), remainders .5 .1 .4 -> +1 to class 0
    t = np.array([0] * 5 + [1] * 3 + [2] * 2)
    _, held = stratified_split(t, 7, seed=0)
    assert np.bincount(t[held], minlength=3).tolist() == [4, 2, 1]
    # long tail: 100 / 5 images, hold out 10 -> proportional 9.52 / 0.48 gives 10 / 0, but the
    # rare class still gets one held-out image (taken from the largest class)
    t = np.array([0] * 100 + [1] * 5)
    _, held = stratified_split(t, 10, seed=0)
    assert np.bincount(t[held]).tolist() == [9, 1]


def test_stratified_split_is_seeded():
    t = np.repeat(np.arange(4), 25)
    a = stratified_split(t, 20, seed=1)[1]
    b = stratified_split(t, 20, seed=1)[1]
    c = stratified_split(t, 20, seed=2)[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_stratified_split_bad_sizes_are_one_line():
    t = np.array([0, 0, 1, 1])
    with pytest.raises(ConfigError, match="at least one"):
        stratified_split(t, 3, seed=0)
    with pytest.raises(ConfigError, match="count >= 1 or a fraction"):
        stratified_split(t, -1, seed=0)
    with pytest.raises(ConfigError, match="count >= 1 or a fraction"):
        parse_count_or_fraction("1.5")
    with pytest.raises(ConfigError, match="count >= 1 or a fraction"):
        parse_count_or_fraction("ten")
    with pytest.raises(ConfigError, match="empty"):
        stratified_split(t, 0.01, seed=0)  # rounds to 0 images
    assert parse_count_or_fraction("500") == 500 and parse_count_or_fraction("0.1") == 0.1


# ---- class map --------------------------------------------------------------------------------


def test_class_map_txt_names_and_indices_subset_and_remap(cifar_labelled, tmp_path):
    f = tmp_path / "weak.txt"
    # timm's format: one class per line, new index = line number; '0' is a source index
    f.write_text("dog\nfrog\nhorse\nship\ntruck\n0\n")
    ds = create_dataset("torch/cifar10", cifar_labelled, "train")
    m = apply_class_map(ds, f)
    assert m.classes == ["dog", "frog", "horse", "ship", "truck", "airplane"]
    assert len(m) == 6 * 30
    assert np.bincount(get_targets(m)).tolist() == [30] * 6
    # every item's pixel-encoded source label maps to its new target
    src_of_new = [5, 6, 7, 8, 9, 0]
    for i in range(0, len(m), 7):
        img, y = m[i]
        assert _label_of_pixel(img) == src_of_new[y]


def test_class_map_dict_forms_merge_classes(cifar_labelled, tmp_path):
    ds = create_dataset("torch/cifar10", cifar_labelled, "validation")
    f = tmp_path / "vehicles.yaml"
    f.write_text("airplane: 0\nship: 0\nautomobile: 1\ntruck: 1\n")
    m = apply_class_map(ds, f)
    assert m.classes == ["airplane+ship", "automobile+truck"]
    assert np.bincount(get_targets(m)).tolist() == [20, 20]
    p = tmp_path / "m.pkl"
    p.write_bytes(pickle.dumps({"cat": 1, "dog": 0}))
    m = apply_class_map(ds, p)
    assert m.classes == ["dog", "cat"]
    assert all(_label_of_pixel(m[i][0]) == (5 if m[i][1] == 0 else 3) for i in range(len(m)))


def test_class_map_relative_to_data_dir(cifar_labelled):
    (cifar_labelled / "two.txt").write_text("cat\ndog\n")
    assert load_class_map("two.txt", cifar_labelled) == {"cat": 0, "dog": 1}


@pytest.mark.parametrize(
    "text, ext, match",
    [
        ("dgo\n", ".txt", "unknown class 'dgo' \\(did you mean 'dog'\\?\\)"),
        ("cat\n\ndog\n", ".txt", "line 2 is empty"),
        ("cat\ncat\n", ".txt", "listed twice"),
        ("12\n", ".txt", "index 12 is out of range"),
        ("cat: 0\ndog: 2\n", ".yaml", "without gaps \\(missing \\[1\\]\\)"),
        ("cat: x\n", ".yaml", "new indices must be integers"),
        ("{}", ".json", "non-empty"),
        ("[1, 2", ".json", "cannot read class map"),
        ("cat", ".csv", "unsupported extension"),
        ("3: 0\n'3': 1\n", ".yaml", "appears twice"),
    ],
)
def test_bad_class_maps_are_one_line(cifar_labelled, tmp_path, text, ext, match):
    f = tmp_path / f"bad{ext}"
    f.write_text(text)
    ds = create_dataset("torch/cifar10", cifar_labelled, "validation")
    with pytest.raises(ConfigError, match=match) as ei:
        apply_class_map(ds, f)
    assert "\n" not in str(ei.value)


def test_class_map_file_missing(cifar_labelled):
    with pytest.raises(ConfigError, match="class map file not found"):
        create_datasets("torch/cifar10", cifar_labelled, class_map="nope.txt")


def test_pickle_class_map_refuses_code(cifar_labelled, tmp_path):
    import os

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"cat": os.getpid}))  # references a global
    with pytest.raises(ConfigError, match="not allowed"):
        load_class_map(p)


# ---- class cap ---------------------------------------------------------------------------------


def test_parse_class_cap():
    assert parse_class_cap(["5=500"], 6) == {5: 500}
    assert parse_class_cap(["100", "2=7"], 3) == {0: 100, 1: 100, 2: 7}
    assert parse_class_cap(None, 3) == {}
    for bad, match in [("6=5", "out of range"), ("x", "expects N"), ("1=0", ">= 1")]:
        with pytest.raises(ConfigError, match=match):
            parse_class_cap([bad], 6)


def test_cap_indices_by_construction():
    t = np.array([0] * 10 + [1] * 10 + [2] * 3)
    keep = cap_indices(t, {1: 4, 2: 5}, seed=0)
    assert np.bincount(t[keep]).tolist() == [10, 4, 3]
    assert np.all(np.diff(keep) > 0)
    assert np.array_equal(keep, cap_indices(t, {1: 4, 2: 5}, seed=0))
    assert not np.array_equal(keep, cap_indices(t, {1: 4, 2: 5}, seed=1))
    assert np.array_equal(keep[t[keep] == 0], np.arange(10))  # uncapped class untouched


def test_apply_class_cap_keeps_classes(cifar_labelled):
    ds = create_dataset("torch/cifar10", cifar_labelled, "train")
    capped = apply_class_cap(ds, {3: 5}, seed=0)
    assert np.bincount(get_targets(capped)).tolist() == [30, 30, 30, 5] + [30] * 6
    assert capped.classes == CIFAR10_CLASSES
    assert all(_label_of_pixel(capped[i][0]) == capped[i][1] for i in range(0, len(capped), 11))
    assert apply_class_cap(ds, {}, seed=0) is ds


# ---- create_datasets: the whole chain --------------------------------------------------------


def test_weak_task_chain_map_cap_holdout(cifar_labelled, tmp_path):
    """The CNNSplitter weak task: classes 5-9 -> 0-4, TC 0 -> 5 capped, 20% held out."""
    f = tmp_path / "weak_tc0.txt"
    f.write_text("dog\nfrog\nhorse\nship\ntruck\nairplane\n")
    s = create_datasets(
        "torch/cifar10", cifar_labelled, class_map=f, class_cap=["5=10"],
        val_from_train=0.2, data_seed=0,
    )  # fmt: skip
    assert np.bincount(get_targets(s.train)).tolist() == [24] * 5 + [8]
    assert np.bincount(get_targets(s.val)).tolist() == [6] * 5 + [2]
    assert np.bincount(get_targets(s.test)).tolist() == [10] * 6
    assert s.info["class_cap"] == {5: 10}
    assert s.info["val_from_train"]["per_class"] == [6] * 5 + [2]
    # held-out and training images are disjoint positions in the original training split
    tr_src, va_src = set(s.train.source_indices.tolist()), set(s.val.source_indices.tolist())
    assert not tr_src & va_src and len(tr_src | va_src) == 5 * 30 + 10
    assert va_src == set(s.info["val_from_train"]["source_indices"])
    # the labels survive the nested subsets: pixel-encoded source label -> new target
    full = create_dataset("torch/cifar10", cifar_labelled, "train")
    src = [5, 6, 7, 8, 9, 0]
    for ds in (s.train, s.val):
        for i in range(len(ds)):
            img, y = ds[i]
            assert _label_of_pixel(img) == src[y]
            assert np.array_equal(np.asarray(img), np.asarray(full[int(ds.source_indices[i])][0]))
    # deterministic: the same arguments rebuild the same held-out images
    s2 = create_datasets(
        "torch/cifar10", cifar_labelled, class_map=f, class_cap=["5=10"],
        val_from_train=0.2, data_seed=0,
    )  # fmt: skip
    assert np.array_equal(s2.val.source_indices, s.val.source_indices)


def test_create_datasets_without_options_is_timm(cifar_labelled):
    s = create_datasets("torch/cifar10", cifar_labelled)
    assert len(s.train) == 300 and len(s.val) == 100 and s.test is None and s.info == {}


def test_holdout_without_class_map(cifar_labelled):
    s = create_datasets("torch/cifar10", cifar_labelled, val_from_train=50, data_seed=1)
    assert np.bincount(get_targets(s.val)).tolist() == [5] * 10
    assert len(s.train) == 250 and len(s.test) == 100


def test_class_map_that_empties_a_class(tmp_path):
    root = tmp_path / "c"
    labels = np.repeat(np.arange(9), 3)  # class 9 (truck) has no training image
    write_cifar(root, "cifar10", train_labels=labels, test_per_class=1)
    f = tmp_path / "m.txt"
    f.write_text("cat\ntruck\n")
    with pytest.raises(DataError, match=r"class\(es\) \[1\] without training images"):
        create_datasets("torch/cifar10", root, class_map=f)
