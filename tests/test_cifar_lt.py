"""CIFAR-10-LT / CIFAR-100-LT: the exact LDAM-DRW subsets, built from full-size label lists.

The fixtures carry the real 50,000 train labels (synthetic pixels) so the class counts are the
published ones. Each image encodes its position in the full split in its first three bytes,
which lets the tests check which images were kept.
"""

from __future__ import annotations

import numpy as np
import pytest

from md_plugin.data.cifar import CIFAR10
from md_plugin.data.cifar_lt import CIFAR10LT, CIFAR100LT, check_imb_ratio
from md_plugin.data.fixtures import write_cifar
from md_plugin.errors import ConfigError, DataError

CIFAR10_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def index_pixels():
    """A ``pixels`` callable writing each image's running index into its first three bytes."""
    seen = 0

    def pixels(labels, rng):
        nonlocal seen
        idx = np.arange(seen, seen + len(labels))
        seen += len(labels)
        out = np.zeros((len(labels), 3072), dtype=np.uint8)
        out[:, 0], out[:, 1], out[:, 2] = idx & 255, (idx >> 8) & 255, idx >> 16
        return out

    return pixels


def decode(data: np.ndarray) -> np.ndarray:
    """Inverse of ``index_pixels`` on torchvision's HWC arrays (bytes 0..2 = row 0, x 0..2, ch 0)."""
    d = data[:, 0, :3, 0].astype(np.int64)
    return d[:, 0] + (d[:, 1] << 8) + (d[:, 2] << 16)


def full_labels(num_classes: int, seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), 50_000 // num_classes)
    np.random.RandomState(seed).shuffle(labels)
    return labels


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Full-size CIFAR-10 and CIFAR-100 train label lists, each in its own folder."""
    out = {}
    for variant, classes in (("cifar10", 10), ("cifar100", 100)):
        root = tmp_path_factory.mktemp(variant)
        labels = full_labels(classes, seed=classes)
        write_cifar(root, variant, train_labels=labels, pixels=index_pixels())
        out[variant] = (root, labels)
    return out


@pytest.mark.parametrize(
    "variant, ratio, total",
    [
        ("cifar10", 100, 12_406),
        ("cifar10", 50, 13_996),
        ("cifar10", 10, 20_431),
        ("cifar100", 100, 10_847),
        ("cifar100", 50, 12_608),
        ("cifar100", 10, 19_573),
    ],
)
def test_published_totals_and_consistency(cifar, variant, ratio, total):
    root, labels = cifar[variant]
    cls = CIFAR10LT if variant == "cifar10" else CIFAR100LT
    ds = cls(root, imb_ratio=ratio)
    counts = ds.get_cls_num_list()
    assert len(ds) == len(ds.targets) == len(ds.data) == total
    assert sum(counts) == total and counts == ds.cls_num_list
    assert counts == np.bincount(ds.targets, minlength=len(counts)).tolist()
    n_max = 5000 if variant == "cifar10" else 500
    assert counts[0] == n_max and counts[-1] == n_max // ratio
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert isinstance(ds.targets, list)
    # every kept image carries its own label: data and targets were subset together
    src = decode(ds.data)
    np.testing.assert_array_equal(src, ds.source_indices)
    np.testing.assert_array_equal(labels[src], ds.targets)
    assert len(np.unique(src)) == total
    if variant == "cifar10" and ratio == 100:
        assert counts == CIFAR10_R100


def test_step_profile(cifar):
    ds = CIFAR10LT(cifar["cifar10"][0], imb_ratio=10, imb_type="step")
    assert ds.get_cls_num_list() == [5000] * 5 + [500] * 5


def test_same_subset_as_ldam_global_seed(cifar):
    """LDAM seeds numpy's global RNG once and shuffles each class's index list in turn."""
    root, labels = cifar["cifar10"]
    ds = CIFAR10LT(root, imb_ratio=100, imb_seed=0)
    state = np.random.get_state()
    try:
        np.random.seed(0)
        expected = []
        for c, n in enumerate(CIFAR10_R100):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            expected.append(idx[:n])
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(decode(ds.data), np.concatenate(expected))
    # and the global RNG was not touched by the dataset
    before = np.random.get_state()[1].copy()
    CIFAR10LT(root, imb_ratio=100, imb_seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_seed_selects_the_subset(cifar):
    root = cifar["cifar100"][0]
    a = CIFAR100LT(root, imb_ratio=100, imb_seed=0)
    b = CIFAR100LT(root, imb_ratio=100, imb_seed=0)
    c = CIFAR100LT(root, imb_ratio=100, imb_seed=1)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.targets == b.targets
    assert a.cls_num_list == c.cls_num_list  # same profile ...
    assert not np.array_equal(decode(a.data), decode(c.data))  # ... other images


def test_test_split_untouched(cifar):
    root = cifar["cifar10"][0]
    lt = CIFAR10LT(root, train=False, imb_ratio=100)
    full = CIFAR10(root, train=False)
    assert lt.targets == full.targets
    np.testing.assert_array_equal(lt.data, full.data)
    assert lt.get_cls_num_list() == [10] * 10  # balanced
    np.testing.assert_array_equal(lt.source_indices, np.arange(100))


def test_getitem_returns_kept_image_and_label(cifar):
    root, labels = cifar["cifar10"]
    ds = CIFAR10LT(root, imb_ratio=100, transform=np.asarray)
    img, y = ds[len(ds) - 1]  # last kept image belongs to the rarest class
    assert y == 9 and img.shape == (32, 32, 3)
    assert labels[decode(img[None])[0]] == 9


@pytest.mark.parametrize("bad", [1, 1.0, 0.5, -10, "abc", "", None, float("inf"), True])
def test_bad_imb_ratio(cifar, bad):
    with pytest.raises(
        ConfigError, match="imb_ratio must be a (finite )?number greater than 1"
    ) as e:
        CIFAR10LT(cifar["cifar10"][0], imb_ratio=bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_numeric_string_ratio_is_accepted():
    assert check_imb_ratio("50") == 50.0
    assert check_imb_ratio(100) == 100.0


def test_bad_imb_type(cifar):
    with pytest.raises(ConfigError, match="imb_type must be one of exp, step, got 'linear'"):
        CIFAR100LT(cifar["cifar100"][0], imb_type="linear")


def test_wrong_variant_folder(cifar):
    with pytest.raises(DataError, match="CIFAR100 not found.*found cifar-10-batches-py"):
        CIFAR100LT(cifar["cifar10"][0])
    with pytest.raises(DataError, match="CIFAR10 not found.*found cifar-100-python"):
        CIFAR10LT(cifar["cifar100"][0])


def test_unbalanced_source_split_is_refused(tmp_path):
    # 190 images -> n_max = 19, but class 0 has only 10
    labels = np.repeat(np.arange(10), [10] + [20] * 9)
    write_cifar(tmp_path, "cifar10", train_labels=labels)
    with pytest.raises(DataError, match="class 0 has 10 training images but .* needs 19"):
        CIFAR10LT(tmp_path, imb_ratio=10)
