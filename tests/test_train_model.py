"""The trainer's model factory (md_plugin/train/model.py): issue 19 item 8's one-line refusals
and the input size of a model built for one size."""

from __future__ import annotations

import csv

import pytest
import torch

from md_plugin.errors import ConfigError
from md_plugin.train.args import parse_args
from md_plugin.train.main import cli
from md_plugin.train.model import create_md_model

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=1"]


@pytest.mark.parametrize("size", [["--img-size", "32"], ["--input-size", "3", "32", "32"]])
def test_the_run_size_reaches_a_fixed_size_model(size):
    """``--img-size 32`` on a ViT built for 224 px ended in timm's AssertionError "Input height
    (32) doesn't match model (224)"; the size is now passed as the model's ``img_size``."""
    model = create_md_model(parse_args([*TINY_VIT, *size]), 10)
    assert tuple(model.patch_embed.img_size) == (32, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_an_explicit_img_size_or_a_free_size_model_is_left_alone():
    model = create_md_model(parse_args([*TINY_VIT, "img_size=48", "--img-size", "32"]), 10)
    assert tuple(model.patch_embed.img_size) == (48, 48)  # --model-kwargs decides
    # the CIFAR ResNet takes any size and refuses unknown keywords: nothing is passed to it
    model = create_md_model(parse_args(["--model", "resnet20_cifar", "--img-size", "64"]), 10)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_grad_checkpointing_on_a_model_without_it_is_one_line():
    """Issue 19 item 8: it was an AttributeError traceback."""
    args = parse_args(["--model", "simcnn_cifar", "--grad-checkpointing"])
    with pytest.raises(ConfigError, match="--grad-checkpointing: simcnn_cifar does not support"):
        create_md_model(args, 10)


def test_model_doctor_on_a_vit_with_only_img_size(cifar10_root, tmp_path):
    """End to end: ``--img-size 32`` alone is enough for a ViT under train_md.py --md."""
    argv = [*TINY_VIT, "--dataset", "torch/cifar10", "--data-dir", str(cifar10_root),
            "--img-size", "32", "-b", "25", "--lr", "0.01", "--warmup-epochs", "0",
            "--smoothing", "0", "--workers", "0", "--no-progress", "--log-interval", "0",
            "--epochs", "1", "--md", "--md-baseline-epochs", "1", "--md-layers", "blocks.0",
            "--md-per-class", "5", "--no-md-report", "--output", str(tmp_path),
            "--experiment", "vit"]  # fmt: skip
    assert cli(argv) == 0
    with open(tmp_path / "vit" / "summary.csv", newline="") as f:
        assert float(list(csv.DictReader(f))[-1]["train_md_channel"]) > 0
