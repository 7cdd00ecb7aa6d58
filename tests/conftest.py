"""Shared fixtures: tiny CIFAR folders in the real format, quiet thread counts."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """A CIFAR-10 folder with 20 train / 10 test images per class (class-coloured noise)."""
    from md_plugin.data.fixtures import write_cifar

    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", train_per_class=20, test_per_class=10)
    return root


@pytest.fixture(scope="session")
def tiny_strong_checkpoint(tmp_path_factory):
    """An untrained ``simcnn_weak`` (width 8, 10 outputs, seed 0) checkpoint: the strong model
    of the ``md-doctor split`` command tests."""
    import timm

    import md_plugin  # noqa: F401  (registers simcnn_weak)

    torch.manual_seed(0)
    model = timm.create_model("simcnn_weak", num_classes=10, width=8)
    path = tmp_path_factory.mktemp("ckpt") / "strong.pth.tar"
    torch.save({"state_dict": model.state_dict()}, path)
    return path
