"""The modules artifact: save/load, fingerprint refusal, ranges, measurements, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from splitter_helpers import NUM_CLASSES, WIDTH, PlantedNet, batches, planted_data

from md_plugin.doctor import Diagnosis, LayerDiagnosis
from md_plugin.errors import MDError
from md_plugin.splitter import (
    SplitModules,
    create_split_graph,
    create_split_modules,
    modularize,
    modules_from_diagnosis,
)


def _hand_modules(model=None) -> SplitModules:
    """Module c keeps exactly its planted channels {4c, 4c+1} in both layers."""
    model = model or PlantedNet()
    sg = create_split_graph(model)
    masks = []
    for c in range(NUM_CLASSES):
        m = torch.zeros(WIDTH, dtype=torch.bool)
        m[[4 * c, 4 * c + 1]] = True
        masks.append([m, m.clone()])
    return create_split_modules(model, sg, list(range(NUM_CLASSES)), masks)


def test_measure_on_hand_modules():
    x, y = planted_data(10)
    mods = _hand_modules()
    stats = mods.measure(batches(x, y))
    assert stats["composed_acc"] == 100.0 and stats["strong_acc"] == 100.0
    for c, m in enumerate(stats["modules"]):
        assert m["kernels_pct"] == pytest.approx(100 * 4 / 24)  # 2 of 12 kernels, 2 layers
        # MACs per image (8x8 maps): conv1 2x3, conv2 2x2, fc 3x2 vs 12x3, 12x12, 3x12
        assert m["flops_pct"] == pytest.approx(
            100 * (64 * 6 + 64 * 4 + 6) / (64 * 36 + 64 * 144 + 36)
        )
        assert m["own_acc"] == 100.0
        # own logit = 3 * (mean of channel c of the image) * 2 on class-c images
        own = 6 * x[y == c, c].mean((1, 2))
        assert m["logit_min"] == pytest.approx(float(own.min()), rel=1e-5)
        assert m["logit_max"] == pytest.approx(float(own.max()), rel=1e-5)
        assert mods.range(c) == pytest.approx((float(own.min()), float(own.max())), rel=1e-5)


def test_save_load_roundtrip_and_module_forward(tmp_path):
    x, y = planted_data(10)
    mods = _hand_modules()
    mods.measure(batches(x, y))
    path = mods.save(tmp_path / "m.safetensors")
    model = PlantedNet()
    back = SplitModules.load(path, model)
    assert back.classes == [0, 1, 2] and torch.equal(back.masks, mods.masks)
    assert torch.equal(back.ranges, mods.ranges)
    assert back.stats["composed_acc"] == 100.0
    with torch.no_grad():
        for c in range(NUM_CLASSES):
            masked, ext = back.module(c), back.module(c, extract=True)
            torch.testing.assert_close(masked(x), ext(x))
        assert torch.equal(back.predict(x), y)


def test_split_of_a_class_subset(tmp_path):
    x, y = planted_data(10)
    mods = modularize(PlantedNet(), batches(x, y), classes=[0, 2], generations=2, population=4,
                      val_images=20, min_confidence=0.5, log=lambda s: None)  # fmt: skip
    assert mods.classes == [0, 2] and mods.masks.shape == (2, 2 * WIDTH)
    assert mods.stats["val_images"] == 20  # class 1 images ignored
    with pytest.raises(MDError, match="class 1 has no module"):
        mods.module(1)


class OtherNet(PlantedNet):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, NUM_CLASSES + 1)


def test_another_model_is_refused(tmp_path):
    path = _hand_modules().save(tmp_path / "m.safetensors")
    with pytest.raises(MDError, match="another model") as e:
        SplitModules.load(path, OtherNet())
    assert "\n" not in str(e.value)


def test_modules_of_other_weights_of_the_same_architecture_are_refused(tmp_path):
    """Issue 19 item 3: same shapes and groups, other weights: patching them would be garbage."""
    path = _hand_modules().save(tmp_path / "m.safetensors")
    other = PlantedNet()
    with torch.no_grad():
        other.fc.bias[0] = 0.5
    with pytest.raises(MDError, match="split from another model: same architecture") as e:
        SplitModules.load(path, other)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    SplitModules.load(path, PlantedNet())  # the weights they were split from


def test_old_modules_file_without_weights_hash_loads_with_a_warning(tmp_path):
    mods = _hand_modules()
    del mods.fingerprint["weights"]  # as written before the hash was recorded
    path = mods.save(tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="record no weights hash"):
        back = SplitModules.load(path, PlantedNet())
    assert back.split_graph is not None


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_bad_modules_file_is_one_line(tmp_path, content):
    path = tmp_path / "m.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MDError) as e:
        SplitModules.load(path)
    assert "\n" not in str(e.value)


def test_a_diagnosis_file_is_not_a_modules_file(tmp_path):
    diag = Diagnosis({"conv2": LayerDiagnosis("conv2", torch.rand(3, WIDTH), torch.ones(3, WIDTH, dtype=torch.bool))},
                     torch.ones(3), {})  # fmt: skip
    path = diag.save(tmp_path / "d.safetensors")
    with pytest.raises(MDError, match="not a modules file"):
        SplitModules.load(path)


def test_bad_classes_are_one_line():
    x, y = planted_data(4)
    for classes, words in [
        ([0, 3], "out of range"),
        ([1], "at least two"),
        ([1, 1], "more than once"),
    ]:
        with pytest.raises(MDError, match=words):
            modularize(PlantedNet(), batches(x, y), classes=classes, generations=1, population=4)


def test_modules_from_diagnosis_keeps_the_relevant_channels():
    scores = torch.rand(3, WIDTH)
    masks = torch.zeros(3, WIDTH, dtype=torch.bool)
    masks[0, [0, 1, 5]] = True
    masks[1, [4]] = True  # class 2: nothing relevant -> its top-scoring channel
    diag = Diagnosis({"conv2": LayerDiagnosis("conv2", scores, masks)}, torch.ones(3), {})
    mods = modules_from_diagnosis(PlantedNet(), diag)
    assert mods.group_masks(0)[1].nonzero().flatten().tolist() == [0, 1, 5]
    assert mods.group_masks(1)[1].nonzero().flatten().tolist() == [4]
    assert mods.group_masks(2)[1].nonzero().flatten().tolist() == [int(scores[2].argmax())]
    assert mods.group_masks(0)[0].all()  # conv1 not diagnosed: kept whole
    bad = Diagnosis({"fc": LayerDiagnosis("fc", scores[:, :3], masks[:, :3])}, torch.ones(3), {})
    with pytest.raises(MDError, match="not a convolution"):
        modules_from_diagnosis(PlantedNet(), bad)
