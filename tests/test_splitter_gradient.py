"""The gradient search (GradSplitter): sign estimator, heads, schedule, planted net, resume,
the artifact's heads, the patch rule with a head, and md-doctor split --search gradient."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from splitter_helpers import PlantedNet, batches, planted_data
from torch.utils.data import DataLoader, TensorDataset

import md_plugin  # noqa: F401  (registers the CIFAR models)
from md_plugin.checkpoint import load_weights
from md_plugin.cli import main
from md_plugin.errors import ConfigError, MDError
from md_plugin.splitter import PatchedModel, SplitModules, modularize
from md_plugin.splitter.calibrate import CalibrationConfig
from md_plugin.splitter.gradinit import sensitivity_target
from md_plugin.splitter.gradsearch import (
    GradConfig,
    _Sign,
    binary_masks,
    create_phase_optimizer,
    schedule,
)
from md_plugin.splitter.head import ModuleHeads, create_module_heads


# -- pieces --------------------------------------------------------------------------------------
def test_sign_binarises_keeps_a_channel_per_group_and_passes_a_clipped_gradient():
    v = torch.tensor([[0.5, -0.2, 0.1, -1.0, -0.3], [-0.1, -0.2, -0.3, 0.2, 0.0]],
                     requires_grad=True)  # fmt: skip
    out = _Sign.apply(v, (3, 2))
    # row 0, group 2 is all <= 0: its largest value (-0.3) keeps its channel; same for row 1
    assert out.tolist() == [[1, 0, 1, 0, 1], [1, 0, 0, 1, 0]]
    g = torch.tensor([[2.0, -3.0, 0.5, 0.1, -0.2], [1.5, 0.0, -0.7, 9.0, -9.0]])
    out.backward(g)
    assert torch.equal(v.grad, g.clamp(-1, 1))  # hardtanh of the incoming gradient, any value
    assert torch.equal(binary_masks(v.detach(), (3, 2)), out.bool())


def test_heads_are_gradsplitters_per_module_mlp_on_relu_logits():
    heads = create_module_heads(3, 4, seed=1)
    z = torch.randn(3, 6, 4)
    out = heads(z)
    t = heads.tensors()
    for i in range(3):
        seq = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 1))
        seq[0].weight.data, seq[0].bias.data = t["0.weight"][i], t["0.bias"][i]
        seq[2].weight.data, seq[2].bias.data = t["2.weight"][i], t["2.bias"][i]
        want = torch.sigmoid(seq(torch.relu(z[i])))[:, 0]
        torch.testing.assert_close(out[i], want)
        torch.testing.assert_close(heads.select(i)(z[i]), want)
    back = ModuleHeads.from_tensors(t)
    torch.testing.assert_close(back(z), out, rtol=0, atol=0)
    # nn.Linear's initialisation bounds, seeded
    assert t["0.weight"].abs().max() <= 0.5 and t["2.weight"].abs().max() <= 10**-0.5
    assert torch.equal(create_module_heads(3, 4, seed=1).tensors()["0.bias"], t["0.bias"])
    with pytest.raises(ValueError, match="2.bias"):
        ModuleHeads.from_tensors({k: v for k, v in t.items() if k != "2.bias"})


def test_schedule_and_learning_rates_follow_gradsplitter():
    cfg = GradConfig(epochs=19, head_epochs=5, mask_lr=0.03, head_lr=0.01)
    assert schedule(cfg) == ["head"] * 5 + ["mask"] * 5 + ["head"] * 2 + ["mask"] * 5 + ["head"] * 2
    assert schedule(GradConfig(epochs=9, head_epochs=0))[:7] == ["mask"] * 5 + ["head"] * 2
    values = torch.ones(2, 3, requires_grad=True)
    heads = create_module_heads(2, 3)
    first = create_phase_optimizer(cfg, 0, values, heads)
    assert [g["lr"] for g in first.param_groups] == [0.01]  # heads only, head lr
    assert all(p is not values for p in first.param_groups[0]["params"])
    mask = create_phase_optimizer(cfg, 5, values, heads)
    assert [g["lr"] for g in mask.param_groups] == [0.03, 0.001]  # masks, then heads
    assert mask.param_groups[0]["params"] == [values]
    later = create_phase_optimizer(cfg, 10, values, heads)
    assert [g["lr"] for g in later.param_groups] == [0.001]  # later head phases: lr / 10


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(target_kernels=0.0), "(0, 1]"),
        (dict(target_kernels=1.5), "(0, 1]"),
        (dict(epochs=0), "--epochs"),
        (dict(images_per_epoch=0), "--images-per-epoch"),
        (dict(mask_init="zeros"), "--mask-init"),
    ],
)
def test_bad_settings_are_one_line(kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
        GradConfig(**kw).validate()


# -- the planted network -------------------------------------------------------------------------
N_PLANTED = 5


def _split(state=None, epochs=30, n=N_PLANTED, images=200, calibration=None, mask_init="ones",
           **kw) -> SplitModules:  # fmt: skip
    xv, yv = planted_data(20, seed=0, num_classes=n)
    xt, yt = planted_data(60, seed=1, num_classes=n)
    cfg = GradConfig(epochs=epochs, head_epochs=2, images_per_epoch=images, batch_size=32,
                     val_images=20 * n, mask_init=mask_init, **kw)  # fmt: skip
    train = DataLoader(TensorDataset(xt, yt), batch_size=50)  # read lazily by index
    return modularize(PlantedNet(n), batches(xv, yv), config=cfg, train_loader=train,
                      calibration=calibration, state_path=str(state) if state else None,
                      log=lambda s: None)  # fmt: skip


@pytest.fixture(scope="module")
def planted_split():
    # alpha 1: with 5 classes and the default 0.1 a module may keep other classes' channels as
    # negative evidence for its head (seen on this net); at 1 they are not worth their kernels
    return _split(alpha=1.0)


def test_gradient_search_finds_the_planted_channels(planted_split):
    mods = planted_split
    assert mods.stats["strong_acc"] == 100.0 and mods.stats["composed_acc"] == 100.0
    for c in range(N_PLANTED):
        for g in mods.group_masks(c):  # conv1 and conv2: only class c's own channels, >= 1
            kept = set(g.nonzero().flatten().tolist())
            assert kept and kept <= {4 * c, 4 * c + 1}, (c, kept)
    assert mods.options["source"] == "gradient" and len(mods.options["history"]) == 30
    h = mods.options["history"]
    assert h[0]["phase"] == "head" and h[0]["kept"] == 1.0 and h[2]["phase"] == "mask"


def test_sensitivity_target_is_the_kernel_fraction_the_ratios_leave():
    groups = [SimpleNamespace(channels=10, kernels=2), SimpleNamespace(channels=4, kernels=1)]
    sg = SimpleNamespace(groups=groups)
    # 3 of 10 channels x 2 kernels + 1 of 4 (at least one) x 1 kernel, of 10 x 2 + 4 x 1
    assert sensitivity_target(sg, [0.3, 0.1]) == pytest.approx(7 / 24)
    assert sensitivity_target(sg, [1.0, 1.0]) == 1.0


def test_auto_mask_init_takes_its_kernel_target_from_the_layer_sensitivity():
    mods = _split(epochs=4, mask_init="auto")
    h, cfg = mods.options["history"], mods.options["config"]
    assert mods.options["init_ratios"] == "auto" and "sensitivity" in mods.options
    assert h[0]["phase"] == "head" and h[0]["kept"] == 1.0  # starts at ones, as GradSplitter
    t = cfg["target_kernels"]
    assert 0 < t < 1 and cfg["alpha"] is None  # the target's default weight: 1.0
    assert mods.stats["composed_acc"] == 100.0


def test_heads_travel_with_the_modules_file(planted_split, tmp_path):
    mods = planted_split
    path = mods.save(tmp_path / "m.safetensors")
    back = SplitModules.load(path, PlantedNet(N_PLANTED))
    assert back.heads.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for k, v in mods.heads.items():
        assert torch.equal(back.heads[k], v)
    x, y = planted_data(8, seed=3, num_classes=N_PLANTED)
    assert torch.equal(back.predict(x), y)
    # the composition is the argmax over the heads' scores of the modules' logits
    with torch.no_grad():
        z = torch.stack([back.module(c)(x) for c in range(N_PLANTED)])
        want = ModuleHeads.from_tensors(back.heads)(z).t()
        torch.testing.assert_close(back.scores(x), want)
        torch.testing.assert_close(back.module_head(2)(z[2]), want[:, 2])
    assert back.options["head"]["hidden"] == 10


def test_patched_model_uses_the_head_score(planted_split):
    mods = planted_split
    torch.manual_seed(0)
    weak = nn.Sequential(nn.Flatten(), nn.Linear(N_PLANTED * 64, 4)).eval()
    x, _ = planted_data(4, seed=4, num_classes=N_PLANTED)
    module, head = mods.module(3), mods.module_head(3)
    p = PatchedModel(weak, module, -1, 3, head=head).eval()
    with torch.no_grad():
        out = p(x)
        torch.testing.assert_close(out[:, 3], head(module(x)))  # no min-max normalisation
        torch.testing.assert_close(out[:, :3], torch.softmax(weak(x), 1)[:, :3])
        # what load_patched does: a skeleton head gets its weights from the state dict
        fresh = PatchedModel(weak, mods.module(3), -1, 3, head=ModuleHeads(1, N_PLANTED).select(0))
        fresh.load_state_dict(p.state_dict())
        torch.testing.assert_close(fresh.eval()(x), out)
    with pytest.raises(ConfigError, match="range"):  # without a head the range is required
        PatchedModel(weak, module, -1, 3)


def _timeless(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.parametrize("stop", [4, 7])  # inside a mask phase (Adam state restored), at a switch
def test_resume_gives_the_same_result_bit_for_bit(tmp_path, stop):
    full = _split(tmp_path / "full.pt", epochs=10, n=3, images=96)
    _split(tmp_path / "cut.pt", epochs=stop, n=3, images=96)  # "killed" after epoch `stop`
    resumed = _split(tmp_path / "cut.pt", epochs=10, n=3, images=96)
    assert torch.equal(full.masks, resumed.masks)
    for k in full.heads:
        assert torch.equal(full.heads[k], resumed.heads[k]), k
    assert _timeless(full.options["history"]) == _timeless(resumed.options["history"])
    assert full.options["best_epoch"] == resumed.options["best_epoch"]
    state = torch.load(tmp_path / "full.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert torch.equal(state["values"], cut["values"])


def test_calibration_refits_the_heads_to_the_calibrated_modules():
    plain = _split(epochs=9, n=3, images=96)
    cal = CalibrationConfig(mode="affine", images=60, steps=10, batch_size=30)
    mods = _split(epochs=9, n=3, images=96, calibration=cal)
    assert mods.calibrated and torch.equal(plain.masks, mods.masks)
    assert not torch.equal(plain.heads["0.weight"], mods.heads["0.weight"])  # re-fitted
    # the heads score the calibrated modules: the file's composition is the heads' argmax
    x, y = planted_data(10, seed=5, num_classes=3)
    with torch.no_grad():
        z = torch.stack([mods.module(c)(x) for c in range(3)])  # calibration folded in
        want = ModuleHeads.from_tensors(mods.heads)(z).argmax(0)
    assert torch.equal(mods.predict(x), want)
    assert mods.stats["composed_acc"] == 100.0


def test_resume_refuses_another_search(tmp_path):
    _split(tmp_path / "s.pt", epochs=1, n=3)
    with pytest.raises(MDError, match="another search"):
        _split(tmp_path / "s.pt", epochs=2, n=3, alpha=0.5)


def test_gradient_search_needs_training_images():
    x, y = planted_data(4)
    with pytest.raises(ConfigError, match="train_loader"):
        modularize(PlantedNet(), batches(x, y), config=GradConfig(epochs=1))


# -- md-doctor split --search gradient -----------------------------------------------------------
def _argv(root, ckpt, out, *extra):
    return [
        "split", "--model", "simcnn_weak", "--model-kwargs", "width=8", "--checkpoint", str(ckpt),
        "--dataset", "torch/cifar10", "--data-dir", str(root), "--val-from-train", "0.5",
        "--classes", "0", "1", "2", "--search", "gradient", "--head-epochs", "1",
        "--images-per-epoch", "16", "--val-images", "15", "--output", str(out),
        "--experiment", "run", "--no-progress", "--min-confidence", "0", *extra,
    ]  # fmt: skip


def test_md_doctor_split_gradient_run_and_resume(
    cifar10_root, tiny_strong_checkpoint, tmp_path, capsys
):
    # --init-ratios auto given: the masks start from the sensitivity (--mask-init auto)
    assert (
        main(
            _argv(
                cifar10_root,
                tiny_strong_checkpoint,
                tmp_path,
                "--epochs",
                "3",
                "--init-ratios",
                "auto",
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "epoch 3/3 [mask]" in out and "composed 3-module accuracy" in out
    assert "chosen epoch" in out
    run = tmp_path / "run"
    for f in ("args.yaml", "modules.safetensors", "modules.csv", "history.csv", "split.log",
              "sensitivity.csv", "sensitivity.png"):  # fmt: skip
        assert (run / f).is_file(), f
    model = timm.create_model("simcnn_weak", num_classes=10, width=8)
    load_weights(model, tiny_strong_checkpoint)
    mods = SplitModules.load(run / "modules.safetensors", model)
    assert mods.heads["0.weight"].shape == (3, 10, 10)  # 3 modules, the model's 10 logits
    assert "phase" in (run / "history.csv").read_text().splitlines()[0]
    argv = _argv(
        cifar10_root,
        tiny_strong_checkpoint,
        tmp_path,
        "--epochs",
        "4",
        "--init-ratios",
        "auto",
        "--resume",
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming the gradient search from epoch 3" in out and "epoch 4/4" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--search", "gradient", "--generations", "5"], "--generations does not apply to --search gradient"),
        (["--search", "gradient", "--alpha", "0.5", "--mutation", "0.1"], "--mutation, --alpha do not apply"),
        (["--epochs", "5"], "--epochs does not apply to --search ga"),
        (["--search", "gradient", "--target-kernels", "1.5"], "--target-kernels must be in (0, 1]"),
        (["--search", "gradient", "--target-kernels", "0"], "--target-kernels must be in (0, 1]"),
        (["--search", "gradient", "--mask-lr", "0"], "--mask-lr and --head-lr must be > 0"),
        (["--search", "grad"], "invalid choice"),
        (["--search", "gradient", "--init-ratios", "0.5"],
         "--init-ratios does not apply to --search gradient --mask-init ones"),
        (["--search", "gradient", "--mask-init", "auto", "--init-ratios", "0.5"],
         "numeric --init-ratios are the GA's"),
        (["--search", "gradient", "--init-ratios", "auto", "--mask-init", "importance"],
         "--init-ratios does not apply to --search gradient --mask-init importance"),
        (["--search", "gradient", "--mask-init", "ones", "--sensitivity-images", "50"],
         "--sensitivity-images does not apply to --search gradient --mask-init ones"),
    ],
)  # fmt: skip
def test_bad_flag_combinations_are_one_line(capsys, extra, words):
    argv = ["split", "--model", "resnet20_cifar", "--checkpoint", "x.pth", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
