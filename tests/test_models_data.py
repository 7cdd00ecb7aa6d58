"""CIFAR ResNets registered with timm; CIFAR folders, digits, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import md_plugin  # noqa: F401
from md_plugin.data.cifar import CIFAR10
from md_plugin.data.datasets import TransformedDataset, create_dataset, get_targets
from md_plugin.data.transforms import create_eval_transform, create_train_transform
from md_plugin.errors import DataError

# reference parameter counts of the 6n+2 CIFAR ResNets with option-A shortcuts (He et al. 2016)
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_cifar_resnets_registered_with_timm(depth):
    name = f"resnet{depth}_cifar"
    assert timm.is_model(name)
    m = timm.create_model(name, num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[depth]
    assert m.pretrained_cfg["input_size"] == (3, 32, 32)


def test_resnet32_shape_and_timm_api():
    m = timm.create_model("resnet32_cifar", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 100)
    f = m.forward_features(x)
    assert f.shape == (2, 64, 8, 8)
    assert m.forward_head(f, pre_logits=True).shape == (2, 64)
    assert m.get_classifier() is m.fc
    assert len(m.layer3) == 5  # n = (32 - 2) / 6
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet32_cifar", pretrained=True)


def test_cifar_folder_from_fixture(cifar10_root):
    train = create_dataset("torch/cifar10", cifar10_root, "train")
    test = create_dataset("cifar10", cifar10_root / "cifar-10-batches-py", "validation")
    assert len(train) == 200 and len(test) == 100
    assert np.bincount(get_targets(train)).tolist() == [20] * 10
    img, label = train[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and 0 <= label < 10
    assert train.classes[0] == "airplane"


def test_missing_cifar_folder_says_where(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        CIFAR10(tmp_path)


def test_digits_dataset_is_bundled():
    pytest.importorskip("sklearn")
    tr = create_dataset("sklearn/digits", None, "train")
    va = create_dataset("sklearn/digits", None, "validation")
    assert len(tr) + len(va) == 1797
    assert set(get_targets(va)) == set(range(10))
    assert tr[0][0].size == (32, 32)


def test_imagefolder_layout(tmp_path):
    for split in ("train", "validation"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(d / f"{i}.png")
    tr = create_dataset("", tmp_path, "train")
    va = create_dataset("", tmp_path, "val")  # synonym of validation
    assert len(tr) == 6 and len(va) == 6 and tr.classes == ["cat", "dog"]


def test_paired_augmentation_keeps_mask_on_the_bright_square():
    """Random crop + flip move image and mask identically."""
    cfg = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    tf = create_train_transform(cfg, crop_padding=6, hflip=0.5, color_jitter=0.0)
    img = np.zeros((32, 32, 3), np.uint8)
    img[5:17, 9:30] = 255
    mask = torch.zeros(32, 32, dtype=torch.uint8)
    mask[5:17, 9:30] = 1
    seen_shift = False
    for seed in range(30):
        torch.manual_seed(seed)
        x, m = tf(Image.fromarray(img), mask)
        bright = x[0] > 0.5
        assert torch.equal(bright, m.bool()), seed
        seen_shift |= not torch.equal(m, mask)
    assert seen_shift  # the augmentation really moved things


def test_rrc_augmentation_keeps_alignment():
    cfg = dict(input_size=(3, 24, 24), mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=1.0)
    tf = create_train_transform(cfg, scale=(0.3, 1.0), color_jitter=0.0, interpolation="nearest")
    img = np.zeros((48, 48, 3), np.uint8)
    img[10:30, 12:40] = 255
    mask = torch.zeros(48, 48, dtype=torch.uint8)
    mask[10:30, 12:40] = 1
    for seed in range(10):
        torch.manual_seed(seed)
        x, m = tf(Image.fromarray(img), mask)
        assert torch.equal(x[0] > 0.5, m.bool())


def test_transformed_dataset_yields_masks_only_where_annotated(cifar10_root):
    base = create_dataset("torch/cifar10", cifar10_root, "train")
    cfg = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    fg = np.zeros((32, 32), bool)
    fg[4:10, 4:10] = True
    ds = TransformedDataset(base, create_eval_transform(cfg), masks={3: fg})
    x, y, m, has = ds[3]
    assert has and m.shape == (1, 32, 32) and m.sum() == 36
    x, y, m, has = ds[4]
    assert not has and m.sum() == 32 * 32
    assert len(TransformedDataset(base, create_eval_transform(cfg))[0]) == 2


def test_simcnn_weak_registered_with_timm():
    """CNNSplitter's weak net: 4 x (conv3x3 64 + ReLU + pool) -> FC 256 -> N, with timm's API."""
    m = timm.create_model("simcnn_weak", num_classes=6).eval()
    # by hand: conv 3->64 (1728 + 64), three convs 64->64 (36864 + 64 each), fc 256*6 + 6
    assert sum(p.numel() for p in m.parameters()) == 1792 + 3 * 36928 + 1542
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 6)
    f = m.forward_features(x)
    assert f.shape == (2, 64, 2, 2) and m.num_features == 256
    assert torch.equal(m.forward_head(f, pre_logits=True), f.flatten(1))
    assert m.pretrained_cfg["input_size"] == (3, 32, 32)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier() is m.fc
    from md_plugin.layers.select import resolve_layers

    assert [r.name for r in resolve_layers(m, "last_conv")] == ["features.9"]
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("simcnn_weak", pretrained=True)
    with pytest.raises(TypeError, match="widht"):  # a misspelt kwarg is refused, not ignored
        timm.create_model("simcnn_weak", num_classes=6, widht=8)
    assert timm.create_model("simcnn_weak", num_classes=6, width=8).num_features == 32


@pytest.mark.parametrize("double_backward", [False, True], ids=["ce", "md_gradient_term"])
def test_cifar_resnet_grad_checkpointing_gives_the_same_gradients(double_backward):
    """Issue 19 item 8: ``--grad-checkpointing`` on the CIFAR ResNets (it was an AttributeError).
    Checkpointed blocks give the same loss and parameter gradients, bit for bit (drop-path's
    randomness is replayed), also for Model Doctor's double backward through a hooked conv
    inside a checkpointed block. (BatchNorm running statistics are updated again during the
    recomputation, as for every timm model under ``checkpoint_seq``.)"""
    from md_plugin.layers import FeatureCapture, resolve_layers

    torch.manual_seed(0)
    plain = timm.create_model("resnet20_cifar", drop_path_rate=0.2)
    ckpt = timm.create_model("resnet20_cifar", drop_path_rate=0.2)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 9])
    losses = []
    for m in (plain, ckpt):
        m.train()
        refs = resolve_layers(m, "layer3.1.conv2", (3, 32, 32))
        with FeatureCapture(m, refs) as cap:
            torch.manual_seed(1)
            out = m(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            if double_backward:
                (a,) = cap.features()
                g = torch.autograd.grad(out.gather(1, y[:, None]).sum(), a, create_graph=True)[0]
                loss = loss + g.abs().sum()
            loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
