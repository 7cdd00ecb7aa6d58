"""Real-world timm configs (args.yaml written by timm's own train.py) load and train one short
epoch on a tiny ImageFolder, with and without Model Doctor.

The recipes in tests/data/recipes/ are full args.yaml files: ResNet A2-style (LAMB, BCE,
mixup/cutmix, RandAugment), DeiT (AdamW, mixup/cutmix, RandAugment, erasing, repeated
augmentation, EMA), ConvNeXt fine-tune (layer decay, head init scale, cutmix min/max, mixup off
epoch), EfficientNet-B0 (RMSpropTF, step decay, keep-ratio crop), CIFAR fine-tune (colour /
grayscale / blur probabilities, DropBlock, --resplit). Only what a CPU test cannot run changes:
a small model of the same family, 32 px, 1 epoch, no AMP, no pretrained download.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from md_plugin.train.args import parse_args
from md_plugin.train.main import cli

RECIPES = Path(__file__).resolve().parent / "data" / "recipes"

# recipe -> (small model of the family, extra flags)
SMALL = {
    "resnet50_a2": ("resnet10t", []),
    "deit_tiny": ("deit_tiny_patch16_224", ["--model-kwargs", "img_size=32", "depth=2"]),
    "convnext_tiny_finetune": ("convnext_atto", []),
    "efficientnet_b0": ("efficientnet_b0", []),
    "cifar10_resnet18_finetune": ("resnet18", ["--num-classes", "3", "--dataset", "",
                                               "--val-split", "validation"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from md_plugin.data.fixtures import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


def _small_copy(name: str, tmp_path: Path) -> Path:
    """The recipe with the keys a command line cannot switch off (store_true) turned off."""
    cfg = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    cfg.update(amp=False, pretrained=False)
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_recipes_parse_with_their_values():
    a2 = parse_args(["-c", str(RECIPES / "resnet50_a2.yaml")])
    assert (a2.bce_loss, a2.bce_target_thresh, a2.mixup, a2.cutmix, a2.aa) == (
        True, 0.2, 0.1, 1.0, "rand-m7-mstd0.5-inc1",
    )  # fmt: skip
    deit = parse_args(["-c", str(RECIPES / "deit_tiny.yaml")])
    assert (deit.aug_repeats, deit.reprob, deit.remode, deit.model_ema) == (3, 0.25, "pixel", True)
    cnx = parse_args(["-c", str(RECIPES / "convnext_tiny_finetune.yaml")])
    assert (cnx.layer_decay, cnx.head_init_scale, cnx.cutmix_minmax) == (0.8, 0.001, [0.2, 0.8])
    eff = parse_args(["-c", str(RECIPES / "efficientnet_b0.yaml")])
    assert (eff.train_crop_mode, eff.opt, eff.drop_path) == ("rkrr", "rmsproptf", 0.2)
    cif = parse_args(["-c", str(RECIPES / "cifar10_resnet18_finetune.yaml")])
    assert (cif.grayscale_prob, cif.drop_block, cif.resplit, cif.recount) == (0.2, 0.1, True, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_recipe_trains_one_epoch(name, folder, tmp_path):
    model, extra = SMALL[name]
    argv = ["-c", str(_small_copy(name, tmp_path)), "--data-dir", str(folder), "--model", model,
            "--input-size", "3", "32", "32", "--epochs", "1", "-b", "8", "--workers", "0",
            "--output", str(tmp_path), "--experiment", "run", "--no-progress", *extra]  # fmt: skip
    assert cli(argv) == 0
    (row,) = _rows(tmp_path / "run" / "summary.csv")
    assert math.isfinite(float(row["train_loss"])) and 0 <= float(row["eval_top1"]) <= 100
    saved = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())
    assert (
        saved["model"] == model
        and saved["aa"] == parse_args(["-c", str(RECIPES / f"{name}.yaml")]).aa
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_a2", "cifar10_resnet18_finetune"])
def test_recipe_with_model_doctor(name, folder, tmp_path, capsys):
    """Mixup/cutmix soft targets and BCE with the Model Doctor losses (dominant label)."""
    model, extra = SMALL[name]
    argv = ["-c", str(_small_copy(name, tmp_path)), "--data-dir", str(folder), "--model", model,
            "--input-size", "3", "32", "32", "--epochs", "1", "-b", "8", "--workers", "0",
            "--output", str(tmp_path), "--experiment", "md", "--no-progress", *extra,
            "--md", "--md-baseline-epochs", "1", "--md-per-class", "2", "--md-alpha", "0.1",
            "--no-md-report"]  # fmt: skip
    assert cli(argv) == 0
    (row,) = _rows(tmp_path / "md" / "summary.csv")
    assert math.isfinite(float(row["train_md_channel"])) and float(row["train_md_channel"]) > 0
    assert (tmp_path / "md" / "diagnosis.safetensors").exists()
