"""Confusion matrix, per-class accuracy and many/medium/few-shot accuracy on known answers."""

from __future__ import annotations

import math

import pytest
import torch

from md_plugin.metrics import confusion_matrix, per_class_accuracy, shot_accuracy, shot_groups


def test_confusion_matrix_rows_are_true_class():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.dtype == torch.long
    assert cm.tolist() == [[1, 2, 0], [0, 1, 1], [1, 0, 0]]


def test_confusion_matrix_accepts_logits_and_adds_up():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.1, 3.0], [5.0, 1.0, 0.0]])
    cm = confusion_matrix(logits, torch.tensor([2, 2, 0]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [1, 0, 1]]
    both = cm + confusion_matrix(torch.tensor([1]), torch.tensor([1]), 3)
    assert both.diagonal().tolist() == [1, 1, 1]


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_per_class_accuracy_with_empty_class_is_nan():
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    acc = per_class_accuracy(cm)
    assert acc[0].item() == pytest.approx(0.75)
    assert math.isnan(acc[1].item())
    assert acc[2].item() == pytest.approx(0.5)


def test_shot_group_boundaries():
    # 101 > 100 -> many; 100 and 20 -> medium (inclusive); 19 -> few
    counts = [101, 100, 20, 19, 5000, 1]
    assert shot_groups(counts) == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}


def test_shot_groups_custom_thresholds():
    assert shot_groups([10, 5, 4], many_thr=5, few_thr=5) == {
        "many": [0],
        "medium": [1],
        "few": [2],
    }


def test_shot_accuracy_means_and_empty_group():
    counts = [500, 200, 100, 20, 19]
    acc = torch.tensor([0.9, 0.7, 0.4, 0.2, 0.1])
    out = shot_accuracy(acc, counts)
    assert set(out) == {"many", "medium", "few"}
    assert out["many"] == pytest.approx(0.8)
    assert out["medium"] == pytest.approx(0.3)
    assert out["few"] == pytest.approx(0.1)
    no_few = shot_accuracy(torch.tensor([1.0, 0.5]), [300, 50])
    assert no_few["many"] == 1.0 and no_few["medium"] == 0.5 and math.isnan(no_few["few"])


def test_shot_accuracy_skips_classes_without_test_samples():
    acc = per_class_accuracy(torch.tensor([[1, 1], [0, 0]]))  # class 1 has no test samples
    out = shot_accuracy(acc, [200, 150])
    assert out["many"] == pytest.approx(0.5)


def test_end_to_end_from_predictions():
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    preds = torch.tensor([0, 0, 1, 0, 0, 0, 3, 0])
    acc = per_class_accuracy(confusion_matrix(preds, targets, 4))
    assert acc.tolist() == [1.0, 0.5, 0.0, 0.5]
    out = shot_accuracy(acc, [1000, 60, 30, 5])
    assert out == pytest.approx({"many": 1.0, "medium": 0.25, "few": 0.5})
