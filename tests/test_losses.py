"""Each loss against values computed by hand from its paper's formula (plain ``math``)."""

from __future__ import annotations

import math

import pytest
import torch

from md_plugin.errors import ConfigError
from md_plugin.losses import classification as cls_losses
from md_plugin.losses.classification import (
    LogitAdjustedLoss,
    class_balanced_weights,
    create_loss,
    ldam_margins,
    list_losses,
    register_loss,
)

LOGITS = [[2.0, 1.0, 0.0], [0.5, 0.5, 3.0], [0.0, 2.5, -1.0]]
TARGET = [0, 1, 1]
COUNTS = [100, 20, 5]


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def p_target(logits=LOGITS, target=TARGET):
    return [softmax(row)[t] for row, t in zip(logits, target)]


def ce_terms(logits=LOGITS, target=TARGET):
    return [-math.log(p) for p in p_target(logits, target)]


def mean(xs):
    return sum(xs) / len(xs)


def run(loss, logits=LOGITS, target=TARGET):
    return loss(torch.tensor(logits), torch.tensor(target)).item()


def test_registry_names():
    assert list_losses() == sorted(
        [
            "ce",
            "focal",
            "reduced_focal",
            "cb_ce",
            "cb_focal",
            "ldam",
            "balanced_softmax",
            "logit_adjust",
        ]
    )


def test_ce_and_label_smoothing():
    assert run(create_loss("ce")) == pytest.approx(mean(ce_terms()), rel=1e-6)
    # smoothed target: (1 - s) on the label plus s / C on every class
    s = 0.3
    expected = mean(
        [
            (1 - s) * -math.log(softmax(row)[t]) + s * mean([-math.log(p) for p in softmax(row)])
            for row, t in zip(LOGITS, TARGET)
        ]
    )
    assert run(create_loss("ce", smoothing=s)) == pytest.approx(expected, rel=1e-6)


def test_focal_hand_value_and_gamma_zero_is_ce():
    expected = mean([(1 - p) ** 2 * -math.log(p) for p in p_target()])
    assert run(create_loss("focal", focal_gamma=2.0)) == pytest.approx(expected, rel=1e-6)
    assert run(create_loss("focal", focal_gamma=0.0)) == pytest.approx(mean(ce_terms()), rel=1e-6)


def test_reduced_focal_hand_value():
    pts = p_target()
    # the three samples straddle th = 0.5: sample 0 (p=0.665) and 2 (p=0.899) are damped
    assert pts[0] > 0.5 and pts[1] < 0.5 and pts[2] > 0.5
    th, g = 0.5, 2.0
    expected = mean([(1.0 if p < th else (1 - p) ** g / th**g) * -math.log(p) for p in pts])
    loss = create_loss("reduced_focal", focal_gamma=g, rfl_threshold=th)
    assert run(loss) == pytest.approx(expected, rel=1e-6)
    assert expected < mean(ce_terms())  # only easy samples lose weight


def test_reduced_focal_threshold_one_is_ce():
    # p_t < 1 always holds, so the weight is 1 everywhere: plain cross-entropy
    loss = create_loss("reduced_focal", focal_gamma=2.0, rfl_threshold=1.0)
    assert run(loss) == pytest.approx(mean(ce_terms()), rel=1e-6)


def test_reduced_focal_weight_is_not_detached():
    # one sample, two classes: p = sigmoid(z0 - z1), L = (1-p)^g / th^g * -log p
    z, th, g = [3.0, 0.0], 0.5, 2.0
    p = 1 / (1 + math.exp(-(z[0] - z[1])))
    w = (1 - p) ** g / th**g
    dw = -g * p * (1 - p) ** g / th**g
    grad_full = w * -(1 - p) + -math.log(p) * dw
    grad_detached = w * -(1 - p)
    logits = torch.tensor([z], requires_grad=True)
    create_loss("reduced_focal", focal_gamma=g, rfl_threshold=th)(
        logits, torch.tensor([0])
    ).backward()
    assert logits.grad[0, 0].item() == pytest.approx(grad_full, rel=1e-4)
    assert abs(grad_full - grad_detached) > 0.1 * abs(grad_detached)


def test_class_balanced_weights_hand_value_and_sum():
    # beta = 0.5, counts [2, 1]: raw (0.5 / 0.75, 0.5 / 0.5) = (2/3, 1); scaled to sum 2
    w = class_balanced_weights([2, 1], beta=0.5)
    assert w.tolist() == pytest.approx([0.8, 1.2])
    w = class_balanced_weights([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], 0.9999)
    assert w.sum().item() == pytest.approx(10.0, rel=1e-6)
    assert bool((w[1:] > w[:-1]).all())  # rarer class, larger weight
    assert class_balanced_weights(COUNTS, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_cb_ce_is_sum_of_weighted_losses_over_n():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [r * 3 / sum(raw) for r in raw]
    terms = ce_terms()
    expected = sum(w[t] * x for t, x in zip(TARGET, terms)) / len(terms)
    torch_style = sum(w[t] * x for t, x in zip(TARGET, terms)) / sum(w[t] for t in TARGET)
    got = run(create_loss("cb_ce", cls_num_list=COUNTS, cb_beta=beta))
    assert got == pytest.approx(expected, rel=1e-6)
    assert abs(got - torch_style) > 1e-3  # the normalisation choice is visible
    # beta = 0: every class weighs 1, i.e. plain CE
    assert run(create_loss("cb_ce", cls_num_list=COUNTS, cb_beta=0.0)) == pytest.approx(
        mean(terms), rel=1e-6
    )


def test_cb_focal_hand_value():
    beta, g = 0.99, 2.0
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [r * 3 / sum(raw) for r in raw]
    focal = [(1 - p) ** g * -math.log(p) for p in p_target()]
    expected = sum(w[t] * f for t, f in zip(TARGET, focal)) / 3
    loss = create_loss("cb_focal", cls_num_list=COUNTS, cb_beta=beta, focal_gamma=g)
    assert run(loss) == pytest.approx(expected, rel=1e-6)


def test_ldam_margins_ratio_and_max():
    # n^{-1/4}: 10000 -> 0.1, 625 -> 0.2, 16 -> 0.5; the largest is scaled to max_m
    assert ldam_margins([10000, 625, 16], max_m=0.5).tolist() == pytest.approx([0.1, 0.2, 0.5])
    m = ldam_margins([10000, 625, 16], max_m=0.3)
    assert m.max().item() == pytest.approx(0.3)
    assert (m[0] / m[1]).item() == pytest.approx(0.5)


def test_ldam_hand_value():
    counts, s = [10000, 625, 16], 2.0
    margins = [0.1, 0.2, 0.5]
    shifted = [
        [s * (v - (margins[t] if c == t else 0.0)) for c, v in enumerate(row)]
        for row, t in zip(LOGITS, TARGET)
    ]
    expected = mean(ce_terms(shifted))
    loss = create_loss("ldam", cls_num_list=counts, ldam_max_m=0.5, ldam_s=s)
    assert run(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["ldam", "ce", "focal"])
def test_drw_switches_exactly_at_drw_epoch(name):
    beta = 0.99
    loss = create_loss(name, cls_num_list=COUNTS, cb_beta=beta, drw_epoch=3, ldam_s=1.0,
                       ldam_max_m=0.5, focal_gamma=1.0)  # fmt: skip
    plain = create_loss(name, cls_num_list=COUNTS, ldam_s=1.0, ldam_max_m=0.5, focal_gamma=1.0)
    per_sample = plain.per_sample(torch.tensor(LOGITS), torch.tensor(TARGET)).tolist()
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [r * 3 / sum(raw) for r in raw]
    weighted = sum(w[t] * x for t, x in zip(TARGET, per_sample)) / sum(w[t] for t in TARGET)

    assert loss.weight is None and run(loss) == pytest.approx(mean(per_sample), rel=1e-6)
    loss.set_epoch(2)
    assert loss.weight is None and run(loss) == pytest.approx(mean(per_sample), rel=1e-6)
    loss.set_epoch(3)
    assert loss.weight.tolist() == pytest.approx(w, rel=1e-6)
    assert run(loss) == pytest.approx(weighted, rel=1e-6)
    assert abs(weighted - mean(per_sample)) > 1e-3
    loss.set_epoch(0)  # a restarted run re-derives the phase from the epoch
    assert loss.weight is None


def test_drw_needs_counts_and_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="cls_num_list"):
        create_loss("ce", drw_epoch=5)
    with pytest.raises(ConfigError, match="deferred re-weighting.*use one of ce, focal, ldam"):
        create_loss("cb_ce", cls_num_list=COUNTS, drw_epoch=5)


def test_balanced_softmax_uniform_prior_is_ce_and_hand_value():
    uniform = create_loss("balanced_softmax", cls_num_list=[7, 7, 7])
    assert run(uniform) == pytest.approx(mean(ce_terms()), rel=1e-6)
    logp = [math.log(n / sum(COUNTS)) for n in COUNTS]
    adjusted = [[v + lp for v, lp in zip(row, logp)] for row in LOGITS]
    expected = mean(ce_terms(adjusted))
    assert run(create_loss("balanced_softmax", cls_num_list=COUNTS)) == pytest.approx(
        expected, rel=1e-6
    )


def test_logit_adjust_tau():
    assert run(create_loss("logit_adjust", cls_num_list=COUNTS, la_tau=0.0)) == pytest.approx(
        mean(ce_terms()), rel=1e-6
    )
    logp = [math.log(n / sum(COUNTS)) for n in COUNTS]
    adjusted = [[v + 2.0 * lp for v, lp in zip(row, logp)] for row in LOGITS]
    got = run(create_loss("logit_adjust", cls_num_list=COUNTS, la_tau=2.0))
    assert got == pytest.approx(mean(ce_terms(adjusted)), rel=1e-6)
    # balanced softmax is the tau = 1 case of the same class
    bs = create_loss("balanced_softmax", cls_num_list=COUNTS)
    la = create_loss("logit_adjust", cls_num_list=COUNTS, la_tau=1.0)
    assert type(bs) is type(la) is LogitAdjustedLoss
    assert run(bs) == pytest.approx(run(la), rel=1e-7)


@pytest.mark.parametrize("name", ["cb_ce", "cb_focal", "ldam", "balanced_softmax", "logit_adjust"])
def test_losses_needing_counts_say_so(name):
    with pytest.raises(ConfigError, match=f"loss '{name}' needs the number of training images"):
        create_loss(name)


def test_unknown_loss_lists_names():
    with pytest.raises(
        ConfigError, match="unknown loss 'efl'; valid names: balanced_softmax, cb_ce"
    ):
        create_loss("efl")


def test_unused_options_are_ignored_and_names_normalised():
    loss = create_loss("Reduced-Focal", smoothing=0.2, ldam_s=5.0, la_tau=3.0, rfl_threshold=1.0)
    assert run(loss) == pytest.approx(mean(ce_terms()), rel=1e-6)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="soft targets"):
        create_loss("ce")(torch.tensor(LOGITS), torch.softmax(torch.tensor(LOGITS), 1))
    with pytest.raises(ConfigError, match="set up for 4 classes but the model outputs 3"):
        create_loss("ldam", cls_num_list=[4, 3, 2, 1])(torch.tensor(LOGITS), torch.tensor(TARGET))
    with pytest.raises(ConfigError, match="positive image count"):
        create_loss("balanced_softmax", cls_num_list=[3, 0, 1])
    with pytest.raises(ConfigError, match="cb_beta"):
        create_loss("cb_ce", cls_num_list=COUNTS, cb_beta=1.0)
    with pytest.raises(ConfigError, match="drw_epoch must be an epoch index >= 0, got -1"):
        create_loss("ldam", cls_num_list=COUNTS, drw_epoch=-1)


def test_weights_are_not_checkpointed():
    loss = create_loss("ldam", cls_num_list=COUNTS, drw_epoch=1)
    assert loss.state_dict() == {}
    loss.set_epoch(1)
    assert loss.state_dict() == {}


def test_register_loss(monkeypatch):
    monkeypatch.setattr(cls_losses, "_LOSSES", dict(cls_losses._LOSSES))

    @register_loss("double_ce")
    def _double(*, smoothing=0.0):
        loss = cls_losses.CrossEntropyLoss(smoothing, weight=[2.0, 2.0, 2.0])
        return loss

    assert "double_ce" in list_losses()
    assert run(create_loss("double_ce", cls_num_list=COUNTS)) == pytest.approx(
        2 * mean(ce_terms()), rel=1e-6
    )
