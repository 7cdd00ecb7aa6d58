"""Layer sensitivity: a group whose thinning destroys the classes is found sensitive."""

from __future__ import annotations

import csv

import pytest
import timm
import torch
import torch.nn as nn
from splitter_helpers import PlantedNet, batches, planted_data

import md_plugin  # noqa: F401
from md_plugin.errors import ConfigError
from md_plugin.splitter import (
    compute_importance,
    create_gene_layout,
    create_split_graph,
    modularize,
)
from md_plugin.splitter.bank import ModuleBank
from md_plugin.splitter.calibrate import CalibrationConfig
from md_plugin.splitter.sensitivity import (
    SensitivityTable,
    choose_init_ratios,
    layer_sensitivity,
    plot_sensitivity,
)
from md_plugin.splitter.split import SensitivityConfig

N = 3


class SensNet(nn.Module):
    """Group A (conv1, 30 channels) is redundant: class c's signal is copied to channels
    10c..10c+9, so any few of them carry it. Group B (conv2, 12 channels) is fragile: class c
    has one signal channel (4c) and three constant "noise" channels that importance ranks
    above it, so a module keeping less than 8 of its 10 gene blocks loses its class."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(N, 10 * N, 1)
        self.conv2 = nn.Conv2d(10 * N, 4 * N, 1)
        self.fc = nn.Linear(4 * N, N)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            for c in range(N):
                self.conv1.weight[10 * c : 10 * c + 10, c] = 1.0
                self.conv2.weight[4 * c, 10 * c : 10 * c + 10] = 0.1
                self.conv2.bias[4 * c + 1 : 4 * c + 4] = 2.0
                self.fc.weight[c, 4 * c] = 3.0
        self.pretrained_cfg = {"architecture": "sens", "input_size": (N, 8, 8)}

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _table(tol: float = 5.0) -> SensitivityTable:
    model = SensNet().eval()
    sg = create_split_graph(model)
    x, y = planted_data(10)
    imp = compute_importance(sg, batches(x, y), list(range(N)), 0.5)
    orders = [[imp.order(i, g) for g in range(2)] for i in range(N)]
    layout = create_gene_layout(sg.num_channels, orders)
    table = layer_sensitivity(ModuleBank(sg), layout, x, y, list(range(N)), batch_size=7)
    choose_init_ratios(table, tol)
    return table


def test_the_fragile_group_is_found_sensitive_and_the_redundant_one_not():
    t = _table()
    assert t.groups == ["conv1", "conv2"] and t.strong_acc == 100.0
    a, b = t.acc
    assert a == [100.0] * 10  # any 3 of a class's 10 copies carry it
    assert all(v < 40 for v in b[:7]) and b[7:] == [100.0] * 3  # 8 of 10 blocks needed
    assert t.init_ratios == [[0.1, 0.2], [0.8, 0.9]]
    assert t.kernels == pytest.approx([100 * 30 / 42, 100 * 12 / 42])


def test_choose_init_ratios_rule():
    t = SensitivityTable(["a", "b", "c"], [0.2, 0.6, 1.0], [[50, 89, 90], [90, 85, 90], [10, 20, 90]], 90.0, 100)  # fmt: skip
    # a: within 1 point from 0.6 on; b: dips at 0.6, so only 1.0 holds; c: only 1.0
    assert choose_init_ratios(t, 1.0, step=0.4) == [[0.6, 1.0], [1.0], [1.0]]
    assert choose_init_ratios(t, 5.0, step=0.4) == [[0.6, 1.0], [0.2, 0.6], [1.0]]
    with pytest.raises(ConfigError, match="tolerance"):
        choose_init_ratios(t, -1.0)


def test_table_csv_rows_and_plot(tmp_path):
    t = _table()
    rows = t.rows()
    assert rows[1]["group"] == "conv2" and rows[1]["acc_r0.8"] == 100.0
    assert rows[1]["init_ratios"] == "0.8 0.9"
    path = plot_sensitivity(SensitivityTable(**t.to_dict()), tmp_path / "s.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "s.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert "acc_r0.1" in (tmp_path / "s.csv").read_text().splitlines()[0]


def test_strong_prefix_skips_only_what_the_group_cannot_change():
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=4).eval()
    sg = create_split_graph(model, (3, 32, 32))
    bank = ModuleBank(sg)
    x = torch.randn(2, 3, 32, 32)
    g = len(sg.groups) - 1  # the last inner conv: most of the network is skipped
    masks = torch.ones(3, bank.mask_size)
    off = sum(sg.num_channels[:g])
    masks[:, off : off + sg.groups[g].channels] = (
        torch.rand(3, sg.groups[g].channels) < 0.5
    ).float()
    with torch.no_grad():
        prefix = bank.strong_prefix(x, g)
        assert prefix is not None and sum(v is not None for v in prefix.values.values()) >= 1
        torch.testing.assert_close(bank(x, masks, prefix=prefix), bank(x, masks))


def test_auto_init_ratios_reach_the_search_and_the_artifact():
    x, y = planted_data(10)
    mods = modularize(PlantedNet(), batches(x, y), generations=1, population=4, val_images=30,
                      min_confidence=0.5, sensitivity=SensitivityConfig(images=30, tolerance=1.0),
                      log=lambda s: None)  # fmt: skip
    sens = mods.options["sensitivity"]
    assert mods.options["init_ratios"] == "auto" and sens["images"] == 30
    assert mods.options["config"]["group_ratios"] == sens["init_ratios"]
    stages = {"importance", "sensitivity", "search", "measure"}
    want = {f"{s}_s" for s in stages} | {f"{s}_cpu_s" for s in stages}
    assert set(mods.options["timings"]) == want
    fixed = modularize(PlantedNet(), batches(x, y), generations=1, population=4, val_images=30,
                       min_confidence=0.5, init_ratios="fixed", log=lambda s: None)  # fmt: skip
    assert "sensitivity" not in fixed.options and fixed.options["config"]["group_ratios"] is None


def test_bad_stage_settings_are_one_line():
    x, y = planted_data(4)
    cases = [
        (dict(init_ratios="sometimes"), "'auto' or 'fixed'"),
        (dict(sensitivity=SensitivityConfig(images=2)), "at least the number of classes"),
        (dict(sensitivity=SensitivityConfig(tolerance=-1)), "tolerance"),
        (dict(calibration=CalibrationConfig(mode="affine")), "needs training images"),
        (dict(calibration=CalibrationConfig(mode="bn", images=0)), "--calibrate-images"),
    ]
    for kw, words in cases:
        with pytest.raises(ConfigError, match=words) as e:
            modularize(PlantedNet(), batches(x, y), generations=1, population=4, **kw)
        assert "\n" not in str(e.value)
