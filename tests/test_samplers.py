"""Class-aware samplers: class frequencies per epoch, determinism, the batch-size check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from md_plugin.data.samplers import (
    ClassBalancedSampler,
    check_batch_size,
    create_sampler,
    list_samplers,
)
from md_plugin.errors import ConfigError

COUNTS = [500, 50, 5]


def make_targets(counts=COUNTS, seed=0):
    t = np.repeat(np.arange(len(counts)), counts)
    np.random.RandomState(seed).shuffle(t)
    return t.tolist()


def class_freq(sampler, targets, num_classes=3):
    idx = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(idx) == len(sampler)
    return np.bincount(np.asarray(targets)[idx], minlength=num_classes) / len(idx)


@pytest.mark.parametrize("name", ["", "none", "random", None, "NONE"])
def test_none_means_plain_shuffling(name):
    assert create_sampler(name, make_targets()) is None


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown sampler 'oversample'; valid names: none, "):
        create_sampler("oversample", make_targets())
    assert list_samplers() == ["none", "class_balanced", "progressive", "sqrt"]


def test_class_balanced_epoch_is_uniform_over_classes():
    targets = make_targets()
    s = create_sampler("class_balanced", targets)
    assert len(s) == 500 * 3  # max class count x classes
    # 375 groups of 4 over 3 classes visited in full passes: exactly 500 draws per class
    np.testing.assert_array_equal(np.bincount(np.asarray(targets)[list(s)]), [500, 500, 500])


def test_class_balanced_groups_and_cycles_within_class():
    targets = make_targets()
    s = ClassBalancedSampler(targets, num_samples_cls=4, seed=3)
    idx = np.array(list(s))
    labels = np.asarray(targets)[idx]
    # consecutive groups of num_samples_cls items share a class (1500 = 375 groups of 4)
    groups = labels.reshape(-1, 4)
    assert (groups == groups[:, :1]).all()
    # every item of the 5-image class is used before any repeats: first 5 draws are distinct
    tail_draws = idx[labels == 2]
    assert sorted(tail_draws[:5].tolist()) == sorted(np.flatnonzero(np.asarray(targets) == 2))
    # classes are visited in cycles of a reshuffled order: each pass covers every class once
    passes = groups[:, 0].reshape(-1, 3)
    assert (np.sort(passes, axis=1) == [0, 1, 2]).all()
    assert len({tuple(p) for p in passes}) > 1  # the order is reshuffled between passes


def test_class_balanced_custom_length_and_group_size():
    targets = make_targets()
    s = create_sampler("class_balanced", targets, num_samples_cls=1, epoch_length=30)
    assert len(s) == 30
    np.testing.assert_array_equal(np.bincount(np.asarray(targets)[list(s)]), [10, 10, 10])


def test_sqrt_sampler_frequencies():
    targets = make_targets()
    s = create_sampler("sqrt", targets, epoch_length=60_000)
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()  # 0.706, 0.223, 0.071
    np.testing.assert_allclose(class_freq(s, targets), expected, atol=0.01)
    assert len(create_sampler("sqrt", targets)) == len(targets)


def test_progressive_interpolates_instance_to_class_balanced():
    targets = make_targets()
    s = create_sampler("progressive", targets, total_epochs=5)
    inst = np.array(COUNTS) / sum(COUNTS)
    np.testing.assert_allclose(s.class_probs(0), inst)
    np.testing.assert_allclose(s.class_probs(2), 0.5 * inst + 0.5 / 3)
    np.testing.assert_allclose(s.class_probs(4), [1 / 3] * 3)
    np.testing.assert_allclose(s.class_probs(9), [1 / 3] * 3)
    # instance-balanced at epoch 0: every item equally likely
    np.testing.assert_allclose(s.item_probs(0), np.full(len(targets), 1 / len(targets)))
    # the drawn frequencies follow the schedule
    long = create_sampler("progressive", targets, total_epochs=5, epoch_length=30_000)
    np.testing.assert_allclose(class_freq(long, targets), inst, atol=0.01)
    long.set_epoch(4)
    np.testing.assert_allclose(class_freq(long, targets), [1 / 3] * 3, atol=0.015)


def test_progressive_needs_total_epochs():
    with pytest.raises(ConfigError, match="total_epochs"):
        create_sampler("progressive", make_targets())


@pytest.mark.parametrize("name", ["class_balanced", "sqrt", "progressive"])
def test_same_seed_and_epoch_same_order(name):
    targets = make_targets()
    a = create_sampler(name, targets, total_epochs=10, seed=7)
    b = create_sampler(name, targets, total_epochs=10, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating an epoch replays it
    first = list(a)
    a.set_epoch(4)
    assert list(a) != first
    c = create_sampler(name, targets, total_epochs=10, seed=8)
    c.set_epoch(3)
    assert list(c) != first


def test_sampler_drives_a_dataloader():
    targets = make_targets([8, 2])
    ds = TensorDataset(torch.arange(10), torch.tensor(targets))
    s = create_sampler("class_balanced", targets, num_samples_cls=2)
    check_batch_size(len(s), 4)
    labels = torch.cat([y for _, y in DataLoader(ds, batch_size=4, sampler=s)])
    assert len(labels) == 16 and labels.sum().item() == 8  # half the draws from class 1


def test_batch_size_check():
    check_batch_size(15, 15)
    with pytest.raises(
        ConfigError, match="batch size 16 is larger than the sampler's epoch length 15"
    ):
        check_batch_size(15, 16)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="non-empty"):
        create_sampler("sqrt", [])
    with pytest.raises(ConfigError, match="num_samples_cls"):
        create_sampler("class_balanced", make_targets(), num_samples_cls=0)
    with pytest.raises(ConfigError, match="epoch_length"):
        create_sampler("sqrt", make_targets(), epoch_length=0)
