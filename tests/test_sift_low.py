"""sift_low_confidence picks exactly the images a hand-built softmax table says it must."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from md_plugin.doctor.sift_low import SiftRecord, sift_low_confidence
from md_plugin.errors import ConfigError

# index: (true label, softmax probabilities over 3 classes)
TABLE = [
    (0, [0.70, 0.20, 0.10]),  # 0  correct, in band
    (0, [0.65, 0.30, 0.05]),  # 1  correct, in band
    (0, [0.90, 0.05, 0.05]),  # 2  correct, above band
    (0, [0.10, 0.85, 0.05]),  # 3  wrong -> 1 at 0.85
    (0, [0.30, 0.45, 0.25]),  # 4  wrong -> 1 at 0.45
    (0, [0.6001, 0.30, 0.0999]),  # 5  correct, just inside low
    (0, [0.5999, 0.3001, 0.10]),  # 6  correct, just below low
    (1, [0.05, 0.7999, 0.1501]),  # 7  correct, just below high
    (1, [0.05, 0.8001, 0.1499]),  # 8  correct, just at/above high
    (1, [0.02, 0.62, 0.36]),  # 9  correct, in band
    (1, [0.05, 0.20, 0.75]),  # 10 wrong -> 2 at 0.75
    (2, [0.40, 0.30, 0.30]),  # 11 wrong -> 0 at 0.40
    (2, [0.40, 0.30, 0.30]),  # 12 same as 11: tie broken by index
]


class TableModel(nn.Module):
    """Returns log(probabilities) of the sample whose id is written in its pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor([p for _, p in TABLE]).log())
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        return self.logits[x[:, 0, 0, 0].round().long()]


def make_loader(batch_size: int = 5, shuffle: bool = False) -> DataLoader:
    ids = torch.arange(len(TABLE), dtype=torch.float32)
    images = ids[:, None, None, None].expand(-1, 3, 4, 4).clone()
    targets = torch.tensor([t for t, _ in TABLE])
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=shuffle)


def indices(records: list[SiftRecord]) -> list[int]:
    return [r.index for r in records]


def test_band_selection_lowest_confidence_first():
    model = TableModel().train()
    recs = sift_low_confidence(model, make_loader(), 3, per_class=2, low=0.6, high=0.8)
    # class 0 in band: 5 (.6001) < 1 (.65) < 0 (.70), keep 2; class 1: 9 (.62) < 7 (.7999)
    assert indices(recs) == [5, 1, 9, 7]
    assert model.calls == [(False, True)] * 3  # 13 samples in batches of 5: eval + inference
    assert model.training  # mode restored
    r = recs[0]
    assert (r.index, r.label, r.pred, r.correct) == (5, 0, 0, True)
    assert r.confidence == pytest.approx(0.6001, abs=1e-5)
    all_ = sift_low_confidence(model, make_loader(batch_size=4), 3, per_class=10)
    assert indices(all_) == [5, 1, 0, 9, 7]


def test_misclassified_first_official_ordering():
    recs = sift_low_confidence(
        TableModel(), make_loader(), 3, per_class=3, misclassified_first=True
    )
    # class 0: 3 (-.85), 4 (-.45), then in band 5, 1, 0 -> first 3
    # class 1: 10 (-.75), 9 (.62), 7 (.7999); class 2: 11, 12 (-.40 each, by index)
    assert indices(recs) == [3, 4, 5, 10, 9, 7, 11, 12]
    wrong = {r.index: r for r in recs if not r.correct}
    assert sorted(wrong) == [3, 4, 10, 11, 12]
    assert (wrong[3].label, wrong[3].pred) == (0, 1)
    assert wrong[3].confidence == pytest.approx(0.10, abs=1e-6)  # true-class probability
    assert (wrong[10].pred, wrong[11].pred) == (2, 0)


def test_misclassified_in_band_counted_once():
    model = TableModel()
    recs = sift_low_confidence(model, make_loader(), 3, low=0.25, high=0.5)
    assert indices(recs) == [4, 11, 12]  # true-class .30 each, in band, though misclassified
    recs = sift_low_confidence(
        model, make_loader(), 3, low=0.25, high=0.5, misclassified_first=True
    )
    assert indices(recs) == [3, 4, 10, 11, 12]


def test_misclassified_first_orders_saturated_wrong_predictions_by_margin():
    """Wrong with a float32 softmax of exactly 1.0 for the prediction: the official
    -conf(pred) score ties; the log-odds still puts the most confidently wrong first."""

    class Logits(nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.register_buffer("z", torch.tensor(rows))

        def forward(self, x):
            return self.z[x[:, 0, 0, 0].round().long()]

    # all labelled class 0, all predicted class 1 with margins 20, 45, 30, 60
    rows = [[0.0, m] for m in (20.0, 45.0, 30.0, 60.0)]
    model = Logits(rows)
    assert (model.z.softmax(1)[:, 1] == 1.0).all()
    ids = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2)
    loader = DataLoader(TensorDataset(ids.clone(), torch.zeros(4, dtype=torch.long)), batch_size=3)
    recs = sift_low_confidence(model, loader, 2, per_class=4, misclassified_first=True)
    assert indices(recs) == [3, 1, 2, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low": 0.8, "high": 0.6},
        {"low": 0.6, "high": 0.6},
        {"low": -0.1, "high": 0.5},
        {"low": 0.5, "high": 1.2},
        {"per_class": 0},
        {"per_class": 2.5},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        sift_low_confidence(TableModel(), make_loader(), 3, **kwargs)


def test_shuffled_loader_and_wrong_class_count_refused():
    with pytest.raises(ConfigError, match="unshuffled"):
        sift_low_confidence(TableModel(), make_loader(shuffle=True), 3)
    model = TableModel().train()
    with pytest.raises(ConfigError, match=r"expected \(batch, 4\)"):
        sift_low_confidence(model, make_loader(), 4)
    assert model.training
