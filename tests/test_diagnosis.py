"""Diagnosis recovers known channel sets, sifts correctly, saves, loads and refuses wrong models."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn

import md_plugin  # noqa: F401
from md_plugin.checkpoint import weights_hash
from md_plugin.doctor import Diagnosis, compute_masks, diagnose
from md_plugin.doctor.diagnosis import _TopN
from md_plugin.errors import ConfigError, MDError

# class k's logit depends only on the channels in S[k] (overlapping sets, none a subset of another)
S = [{0, 1}, {1, 2, 3}, {4, 5}, {6}, {0, 7}]
C, K = 8, len(S)


def _weights() -> torch.Tensor:
    w = torch.zeros(K, C)
    for k, chans in enumerate(S):
        for c in chans:
            w[k, c] = 1.0 + 0.25 * c  # unequal but all >= 1: min-max ratio stays > theta
    return w


class ConvTruth(nn.Module):
    """x -> conv (identity, the target) -> ReLU -> GAP -> fc with the known weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C, K, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(C)[:, :, None, None])
            self.fc.weight.copy_(_weights())

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class FCTruth(nn.Module):
    """x -> fc1 (identity, the penultimate FC) -> ReLU -> head with the known weights."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(C, C, bias=False)
        self.act = nn.ReLU()
        self.head = nn.Linear(C, K, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(C))
            self.head.weight.copy_(_weights())

    def forward(self, x):
        return self.head(self.act(self.fc1(x)))


def _data(spatial: bool, n_per_class: int = 12, seed: int = 0):
    """Images of class k light up the channels of S[k] (plus noise); 4 batches."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k, chans in enumerate(S):
        base = torch.zeros(C)
        base[list(chans)] = 3.0
        for _ in range(n_per_class):
            amp = 0.5 + torch.rand(1, generator=g)
            v = base * amp + 0.05 * torch.rand(C, generator=g)
            xs.append(v[:, None, None].expand(C, 4, 4).clone() if spatial else v)
            ys.append(k)
    x, y = torch.stack(xs), torch.tensor(ys)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)]


def _expected_masks() -> torch.Tensor:
    m = torch.zeros(K, C, dtype=torch.bool)
    for k, chans in enumerate(S):
        m[k, list(chans)] = True
    return m


@pytest.mark.parametrize(
    "model_cls, spec, spatial", [(ConvTruth, "conv", True), (FCTruth, "penultimate_fc", False)]
)
@pytest.mark.parametrize("rule", ["theta", "mean"])
def test_diagnosis_recovers_known_channel_sets(model_cls, spec, spatial, rule):
    model = model_cls()
    d = diagnose(model, _data(spatial), spec, K, per_class=10, mask_rule=rule,
                 input_size=(C, 4, 4) if spatial else (C,))  # fmt: skip
    (ld,) = d.layers.values()
    assert torch.equal(d.counts, torch.full((K,), 10))
    if rule == "theta":
        assert torch.equal(ld.masks, _expected_masks())
    else:  # >= mean keeps only the larger weights of a set: still a subset of S[k], never outside
        assert not (ld.masks & ~_expected_masks()).any()
    # scores: each of the 10 images contributes W[k, c] (spatial: mean pool spreads 1/16 over 16 cells)
    assert torch.allclose(ld.scores, 10 * _weights(), atol=1e-5)


def test_topk_rule_and_abs_mode():
    d = diagnose(ConvTruth(), _data(True), "conv", K, per_class=5, mask_rule="topk", topk=1,
                 grad_mode="abs", input_size=(C, 4, 4))  # fmt: skip
    ld = d.layers["conv"]
    assert ld.masks.sum(1).tolist() == [1] * K
    # the highest weight of each set is the largest channel index (weights grow with c)
    assert ld.masks.float().argmax(1).tolist() == [max(s) for s in S]


def test_sifting_keeps_top_n_correct_and_confident():
    """Only correctly classified images count, and only the N most confident of a class."""

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.logits = logits

        def forward(self, x):
            idx = x[:, 0, 0, 0].long()
            f = self.conv(x)
            return self.logits[idx] + 1e-6 * f.mean((1, 2, 3))[:, None]

    # sample i has logits row i; labels below
    logits = torch.tensor([[3.0, 0], [1, 0], [0, 2], [5, 0], [0, 1], [0, 4], [2, 0]])
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 1])  # sample 6 is misclassified
    x = torch.arange(7).float()[:, None, None, None].expand(7, 1, 2, 2).clone()
    buf_model = Fixed(logits)
    d = diagnose(buf_model, [(x[:4], labels[:4]), (x[4:], labels[4:])], "conv", 2, per_class=2,
                 input_size=(1, 2, 2))  # fmt: skip
    assert d.counts.tolist() == [2, 2]
    # min_confidence above softmax([0,1])[1] = 0.73 drops sample 4 from class 1's candidates
    d2 = diagnose(
        buf_model, [(x, labels)], "conv", 2, per_class=3, min_confidence=0.8, input_size=(1, 2, 2)
    )
    assert d2.counts.tolist() == [2, 2]  # class 0: samples 0 (0.95) and 3 (0.99); class 1: 2, 5


def test_topn_buffer_keeps_highest_confidences_across_batches_and_ranks():
    buf = _TopN(2, 2, [3])
    buf.add(torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.9, 0.7]), torch.tensor([0, 1, 2]),
            [torch.eye(3)])  # fmt: skip
    buf.add(torch.tensor([0, 1]), torch.tensor([0.95, 0.6]), torch.tensor([3, 4]),
            [torch.ones(2, 3) * 2])  # fmt: skip
    assert buf.conf[0].tolist() == pytest.approx([0.95, 0.9])
    assert buf.conf[1].tolist() == pytest.approx([0.7, 0.6])
    assert buf.index.tolist() == [[3, 1], [2, 4]]
    # merging two ranks' buffers gives the global top-N
    other = torch.tensor([[0.99, 0.1], [0.65, 0.0]], dtype=torch.float64)
    conf = torch.stack([buf.conf, other])
    index = torch.stack([buf.index, torch.tensor([[5, 6], [7, 8]])])
    vecs = [torch.stack([buf.vecs[0], torch.full((2, 2, 3), 7.0)])]
    buf.merge_from(conf, index, vecs)
    assert buf.conf[0].tolist() == pytest.approx([0.99, 0.95])
    assert buf.conf[1].tolist() == pytest.approx([0.7, 0.65])
    assert buf.index.tolist() == [[5, 3], [2, 7]]
    assert buf.vecs[0][0, 0].tolist() == [7.0, 7.0, 7.0]


def test_topn_ties_go_to_the_lower_dataset_index_whatever_the_arrival_order():
    for order in ([4, 1, 3, 0, 2], [0, 1, 2, 3, 4], [2, 4, 0, 3, 1]):
        buf = _TopN(1, 2, [1])
        for i in order:  # one sample per batch, equal keys
            buf.add(torch.tensor([0]), torch.tensor([5.0]), torch.tensor([i]),
                    [torch.tensor([[float(i)]])])  # fmt: skip
        assert buf.index[0].tolist() == [0, 1]
        assert buf.vecs[0][0, :, 0].tolist() == [0.0, 1.0]


class Saturated(nn.Module):
    """Channels 0-1 carry class evidence (logit margin = their value); channel 2+j is image j's
    marker, with weight 1 for BOTH classes: it shifts every logit equally (margins unchanged) and
    gets a positive gradient only in the images that are picked."""

    def __init__(self, n_images: int):
        super().__init__()
        c = 2 + n_images
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c)[:, :, None, None])
            w = torch.ones(2, c)
            w[:, :2] = torch.eye(2)
            self.fc.weight.copy_(w)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_diagnosis_ranks_saturated_confidences_by_log_odds():
    """Every image has a float32 softmax of exactly 1.0 (margins 20-60, a float64 log-softmax
    is 0.0 from ~37 on): the N most confident must still be the N largest margins."""
    from md_plugin.doctor.diagnosis import true_class_log_odds

    margins = [20.0, 60.0, 25.0, 45.0, 30.0, 50.0]
    n = len(margins)
    x = torch.zeros(n, 2 + n, 2, 2)
    for j, m in enumerate(margins):
        x[j, 0] = m  # all class 0
        x[j, 2 + j] = 1e-3  # marker
    y = torch.zeros(n, dtype=torch.long)
    model = Saturated(n)
    logits = model(x)
    assert (logits.float().softmax(1)[:, 0] == 1.0).all()  # the ties the official code sees
    assert (logits.double().log_softmax(1)[[1, 3, 5], 0] == 0.0).all()
    assert true_class_log_odds(logits, y).tolist() == pytest.approx(margins, rel=1e-6)
    for perm in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]):
        loader = [(x[[i]], y[[i]]) for i in perm]  # one image per batch, in a shuffled order
        with pytest.warns(UserWarning, match="no correctly classified"):  # class 1 is empty
            d = diagnose(model, loader, "conv", 2, per_class=3, input_size=(2 + n, 2, 2))
        picked = (d.layers["conv"].scores[0, 2:] > 0).nonzero().flatten().tolist()
        assert picked == [1, 3, 5]  # margins 60, 45, 50
        assert d.options["rank_by"] == "log_odds_fp64"


def test_class_without_images_gets_all_relevant_mask():
    data = [(x[y != 3], y[y != 3]) for x, y in _data(True)]
    with pytest.warns(UserWarning, match=r"no correctly classified image.*\[3\]"):
        d = diagnose(ConvTruth(), data, "conv", K, per_class=5, input_size=(C, 4, 4))
    ld = d.layers["conv"]
    assert d.counts[3] == 0 and ld.masks[3].all()
    assert torch.equal(ld.masks[[0, 1, 2, 4]], _expected_masks()[[0, 1, 2, 4]])


def test_mask_rules_on_hand_values():
    s = torch.tensor([[0.0, 1.0, 2.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    # min-max: row 0 -> [0, .1, .2, 1]; > 0.15 keeps channels 2, 3; a flat row is all relevant
    assert compute_masks(s, rule="theta", theta=0.15).tolist() == [
        [False, False, True, True],
        [True] * 4,
    ]
    assert compute_masks(s, rule="mean").tolist() == [[False, False, False, True], [True] * 4]
    assert compute_masks(s, rule="topk", topk=2)[0].tolist() == [False, False, True, True]
    with pytest.raises(ConfigError):
        compute_masks(s, rule="theta", theta=1.5)


def test_save_load_roundtrip_and_mismatch(tmp_path):
    model = timm.create_model("resnet20_cifar", num_classes=K)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, K, (8,))) for _ in range(2)]
    with pytest.warns(UserWarning):
        d = diagnose(model, data, "last_conv,layer2.2.conv2", K, per_class=3)
    path = d.save(tmp_path / "d.safetensors")
    e = Diagnosis.load(path)
    assert e.layer_names == ["layer2.2.conv2", "layer3.2.conv2"]
    for n in d.layer_names:
        assert torch.equal(e.layers[n].masks, d.layers[n].masks)
        assert torch.equal(e.layers[n].scores, d.layers[n].scores)
    assert torch.equal(e.counts, d.counts) and e.fingerprint == d.fingerprint
    assert e.options["per_class"] == 3
    from md_plugin.layers import resolve_layers

    e.check_compatible(model, resolve_layers(model, e.layer_names), K)
    other = timm.create_model("resnet32_cifar", num_classes=K)
    with pytest.raises(MDError, match="different parameter shapes"):
        e.check_compatible(other, resolve_layers(other, e.layer_names), K)
    with pytest.raises(MDError, match="classes"):
        e.check_compatible(model, resolve_layers(model, e.layer_names), K + 1)
    with pytest.raises(MDError, match="do not match"):
        e.check_compatible(model, resolve_layers(model, "layer1.0.conv1"), K)
    # remask reuses the scores
    r = e.remask("topk", topk=4)
    expect = [4 if c > 0 else 64 for c in e.counts.tolist()]  # no images: all relevant
    assert r.layers["layer3.2.conv2"].masks.sum(1).tolist() == expect


def test_load_with_a_model_checks_it(tmp_path):
    """Issue 21 item 8: Diagnosis.load(path, model) refuses another model in one line; other
    weights of the same architecture are a warning (a treated model is the normal case)."""
    model = ConvTruth()
    d = diagnose(model, _data(True), "conv", K, per_class=4)
    assert d.fingerprint["weights"] == weights_hash(model)
    path = d.save(tmp_path / "d.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = Diagnosis.load(path, model)
    assert e.fingerprint == d.fingerprint
    wider = nn.Sequential(nn.Conv2d(C, C + 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(C + 1, K))  # fmt: skip
    for other, words in [(FCTruth(), "different parameter shapes"), (wider, "different")]:
        with pytest.raises(MDError, match=words) as err:
            Diagnosis.load(path, other)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    treated = ConvTruth()
    with torch.no_grad():
        treated.fc.weight[0, 0] += 0.1
    with pytest.warns(UserWarning, match="other weights of ConvTruth") as w:
        Diagnosis.load(path, treated)
    assert len(w) == 1 and "\n" not in str(w[0].message)


def test_repr_is_a_short_summary():
    d = diagnose(ConvTruth(), _data(True), "conv", K, per_class=4)
    text = repr(d)
    assert "tensor(" not in text and len(text.splitlines()) == 3
    assert text.splitlines()[0] == f"Diagnosis of ConvTruth: {K} classes, 1 layer(s)"
    assert "images per class: 4 each" in text
    rel = " ".join(str(n) for n in d.layers["conv"].masks.sum(1).tolist())
    assert f"conv ({C} channels), relevant per class: {rel}" in text
    assert "tensor(" not in repr(d.layers["conv"])
    many = Diagnosis({}, torch.arange(30), {"arch": "x"})
    assert "0 1 2 3 4 5 6 7 8 9 ... (min 0, max 29)" in repr(many)


def test_corrupt_diagnosis_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x00\x01garbage")
    with pytest.raises(MDError, match="cannot read diagnosis"):
        Diagnosis.load(p)
    with pytest.raises(MDError, match="not found"):
        Diagnosis.load(tmp_path / "missing.safetensors")


def _spatial_batch(labels, channels=C):
    return [(torch.rand(len(labels), channels, 4, 4), labels)]


@pytest.mark.parametrize(
    "data, num_classes, words",
    [
        (_spatial_batch(torch.tensor([0, 1, 5])), K, "label 5, out of range for 5 classes (0..4)"),
        (_spatial_batch(torch.tensor([0, -1])), K, "label -1, out of range"),
        (_spatial_batch(torch.tensor([0.0, 1.0])), K, "labels are float32, not integer class"),
        (_spatial_batch(torch.eye(K)[:3]), K, "labels are float32, not integer class"),
        (_spatial_batch(torch.tensor([[0], [1]])), K, "labels of shape (2, 1) for 2 images"),
        (_spatial_batch(torch.tensor([0, 1])), K - 2, "num_classes=3 but the model outputs (5,)"),
        (_spatial_batch(torch.tensor([0, 1]), channels=1), K, "the images have 1 channel(s) but"),
    ],
)
@pytest.mark.parametrize("input_size", [None, (C, 4, 4)])  # resolved by the trace, or given
def test_bad_loader_input_is_one_line(data, num_classes, words, input_size):
    """Issue 19 item 8: labels out of range, negative, float or one-hot, a too-small num_classes
    and 1-channel images are one MDError line, not a torch traceback."""
    with pytest.raises(MDError) as e:
        diagnose(ConvTruth(), data, "conv", num_classes, per_class=2, input_size=input_size)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_grayscale_images_for_an_rgb_timm_model_is_one_line():
    model = timm.create_model("resnet20_cifar", num_classes=K)
    data = [(torch.rand(4, 1, 32, 32), torch.arange(4))]
    with pytest.raises(MDError, match=r"1 channel\(s\) but the model takes 3 .*in_chans=1"):
        diagnose(model, data, "last_conv", K, per_class=2)


def test_list_labels_are_accepted():
    batches = [(x, y.tolist()) for x, y in _data(True)]
    d = diagnose(ConvTruth(), batches, "conv", K, per_class=4)
    assert torch.equal(d.layers["conv"].masks, diagnose(ConvTruth(), _data(True), "conv", K,
                                                        per_class=4).layers["conv"].masks)  # fmt: skip


def test_bad_options():
    with pytest.raises(ConfigError, match="grad mode"):
        diagnose(ConvTruth(), [], "conv", K, grad_mode="sq", input_size=(C, 4, 4))
    with pytest.raises(ConfigError, match="per class"):
        diagnose(ConvTruth(), [], "conv", K, per_class=0, input_size=(C, 4, 4))


def test_diagnosis_is_deterministic():
    m = timm.create_model("resnet20_cifar", num_classes=K)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, K, (8,), generator=g))
        for _ in range(3)
    ]
    with pytest.warns(UserWarning):
        a = diagnose(m, data, "last_conv", K, per_class=2)
    with pytest.warns(UserWarning):
        b = diagnose(m, data, "last_conv", K, per_class=2)
    assert torch.equal(a.layers["layer3.2.conv2"].masks, b.layers["layer3.2.conv2"].masks)
    assert torch.equal(a.layers["layer3.2.conv2"].scores, b.layers["layer3.2.conv2"].scores)
