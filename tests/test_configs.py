"""Every shipped config parses with the strict YAML loader, and the LT configs mean what they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from md_plugin.train.args import parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    a = parse_args(["-c", str(path)])
    assert a.model and a.epochs >= 1


def test_lt_recipe_and_md_configs():
    a = parse_args(["-c", str(CONFIGS[0].parent / "cifar10_lt_ldam_drw.yaml")])
    assert (a.dataset, a.imb_ratio, a.loss, a.drw_epoch) == ("cifar10_lt", 100.0, "ldam", 160)
    assert (a.sched, a.decay_milestones, a.decay_rate, a.warmup_epochs) == (
        "multistep",
        [160, 180],
        0.01,
        5,
    )
    m = parse_args(["-c", str(CONFIGS[0].parent / "cifar100_lt_balanced_softmax_md.yaml")])
    assert m.md and m.md_layers == "layer3.*.conv2" and m.loss == "balanced_softmax"
    assert m.initial_checkpoint.endswith("cifar100_lt_balanced_softmax/last.pth.tar")
    assert len(CONFIGS) >= 9
