"""Every shipped config parses with the strict YAML loader, and the LT configs mean what they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from md_plugin.train.args import parse_args

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# train_md.py configs (accelerate_*.yaml are `accelerate launch --config_file` configs)
CONFIGS = [p for p in ALL if not p.name.startswith(("split_", "accelerate_"))]
SPLIT_CONFIGS = [p for p in ALL if p.name.startswith("split_")]  # md-doctor split configs


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


@pytest.mark.parametrize("path", SPLIT_CONFIGS, ids=lambda p: p.name)
def test_split_config_parses(path):
    from md_plugin.splitter.cli import create_split_parser, parse_split_args
    from md_plugin.splitter.cli_config import search_config

    a = parse_split_args(["-c", str(path), "--checkpoint", "strong.pth.tar"])
    cfg = search_config(a, create_split_parser())
    assert a.model == "resnet20_cifar" and a.class_map and a.val_from_train
    assert (cfg.generations, cfg.population, cfg.val_images) == (30, 20, 500)
    root = Path(__file__).resolve().parents[1]  # the config is written for the repo root
    assert (root / a.class_map).read_text().split() == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
    ]
