"""CNNSplitter patching: the paper's replace-and-argmax rule and its metrics, on hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from md_plugin.errors import ConfigError
from md_plugin.splitter import PatchedModel, evaluate_patch, own_class_range, tc_metrics


class Lookup(nn.Module):
    """``x`` holds sample ids in column 0; returns fixed logits per id (plus a dummy parameter)."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.table[x[:, 0].long()] + 0 * self.dummy


# weak model: 3 classes, the target class (TC) is the last; the module: 2 strong classes, own = 1
WEAK = [[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0]]
MODULE = [[0.0, 3.0], [0.0, 4.0], [0.0, 0.0], [0.0, 9.0]]
LABELS = [0, 2, 1, 2]
RANGE = (1.0, 5.0)  # m' = (z - 1) / 4: 0.5, 0.75, -0.25, 2.0


def _patched(target_class=-1):
    return PatchedModel(Lookup(WEAK), Lookup(MODULE), target_class, 1, RANGE).eval()


def _ids():
    return torch.arange(4).view(4, 1)


def test_patch_rule_by_hand():
    out = _patched()(_ids())
    e = math.e
    expected = [
        [e**2 / (e**2 + 2), 1 / (e**2 + 2), 0.5],
        [1 / (2 + e**0.5), e**0.5 / (2 + e**0.5), 0.75],
        [1 / (1 + e + e**3), e / (1 + e + e**3), -0.25],  # unclipped below 0
        [e**5 / (e**5 + 2), 1 / (e**5 + 2), 2.0],  # unclipped above 1
    ]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # before: argmax of the weak logits 0, 1, 2, 0; after: 0, TC, 1, TC
    assert out.argmax(1).tolist() == [0, 2, 1, 2]


def test_target_class_anywhere_and_equivalent_form():
    """TC in the middle; and 'TC iff m' > max_{j != TC} p_j' on random logits."""
    w = [[r[2], r[0], r[1]] for r in WEAK]  # TC moved to index 0
    p = PatchedModel(Lookup(w), Lookup(MODULE), 0, 1, RANGE).eval()
    assert p(_ids()).argmax(1).tolist() == [1, 0, 2, 0]
    g = torch.Generator().manual_seed(0)
    logits, m = torch.randn(500, 6, generator=g) * 3, torch.randn(500, generator=g)
    pred = PatchedModel.combine(logits, m, 4).argmax(1)
    probs = torch.softmax(logits, 1)
    others = torch.cat([probs[:, :4], probs[:, 5:]], 1).max(1).values
    assert torch.equal(pred == 4, m > others)
    masked = probs.clone()
    masked[:, 4] = -1.0  # otherwise the weak model's own argmax among the other classes
    assert torch.equal(pred[pred != 4], masked.argmax(1)[pred != 4])
    assert 50 < int((pred == 4).sum()) < 450  # both branches exercised


def test_tc_metrics_by_hand():
    # TC = 2: TP at 0, 1; FP at 2 (label 0); FN at 3 (predicted 0); index 4 correct non-TC
    m = tc_metrics([2, 2, 2, 0, 1], [2, 2, 0, 2, 1], 2)
    assert (m["tp"], m["fp"], m["fn"], m["n_tc"], m["n_non_tc"]) == (2, 1, 1, 3, 2)
    assert m["tc_precision"] == pytest.approx(200 / 3)
    assert m["tc_recall"] == pytest.approx(200 / 3)
    assert m["tc_f1"] == pytest.approx(200 / 3)
    assert m["non_tc_acc"] == pytest.approx(50.0)  # the non-TC image called TC counts as wrong
    assert m["acc"] == pytest.approx(60.0)
    z = tc_metrics([0, 1], [0, 1], 2)  # TC never predicted nor present: 0, not NaN
    assert (z["tc_precision"], z["tc_recall"], z["tc_f1"], z["non_tc_acc"]) == (0, 0, 0, 100)


def test_evaluate_patch_before_after_by_hand():
    loader = [(_ids()[:2], torch.tensor(LABELS[:2])), (_ids()[2:], torch.tensor(LABELS[2:]))]
    r = evaluate_patch(_patched(), loader)
    b, a = r["before"], r["after"]
    # before: predictions 0, 1, 2, 0 -> no TP: P = R = F1 = 0; non-TC: 1 of 2 right
    assert (b["tp"], b["fp"], b["fn"]) == (0, 1, 2)
    assert (b["tc_precision"], b["tc_recall"], b["tc_f1"], b["non_tc_acc"]) == (0, 0, 0, 50)
    # after: 0, 2, 1, 2 -> every image right
    assert (a["tc_precision"], a["tc_recall"], a["tc_f1"], a["non_tc_acc"]) == (100, 100, 100, 100)


def test_patched_model_evaluates_and_saves_like_any_model(tmp_path):
    from accelerate import Accelerator

    from md_plugin.train.engine import evaluate

    p = _patched()
    loader = [(_ids(), torch.tensor(LABELS))]
    r = evaluate(p, loader, Accelerator(cpu=True), 3)
    assert r["top1"] == 100.0  # the trainer's evaluate reads the argmax of forward()
    torch.save(p.state_dict(), tmp_path / "patched.pth")
    sd = torch.load(tmp_path / "patched.pth")
    assert sd["value_range"].tolist() == [1.0, 5.0]
    fresh = PatchedModel(Lookup(WEAK), Lookup(MODULE), -1, 1, (0.0, 1.0))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.eval()(_ids()), p(_ids()))


def test_own_class_range_on_class_images_only():
    loader = [(_ids(), torch.tensor([1, 1, 0, 1]))]  # class 1 at ids 0, 1, 3: logits 3, 4, 9
    assert own_class_range(Lookup(MODULE), loader, 1) == (3.0, 9.0)
    with pytest.raises(ConfigError, match="at least two"):
        own_class_range(Lookup(MODULE), loader, 0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(value_range=(2.0, 2.0)), "max > min"),
        (dict(value_range=(0.0, float("nan"))), "finite"),
        (dict(module_class=-1), "module_class must be >= 0"),
    ],
)
def test_bad_patch_arguments_are_one_line(kw, match):
    args = dict(target_class=-1, module_class=1, value_range=RANGE) | kw
    with pytest.raises(ConfigError, match=match):
        PatchedModel(Lookup(WEAK), Lookup(MODULE), **args)


def test_out_of_range_classes_at_forward():
    with pytest.raises(ConfigError, match="target class 3 is out of range"):
        PatchedModel(Lookup(WEAK), Lookup(MODULE), 3, 1, RANGE)(_ids())
    with pytest.raises(ConfigError, match="module class 2 is out of range"):
        PatchedModel(Lookup(WEAK), Lookup(MODULE), -1, 2, RANGE)(_ids())
