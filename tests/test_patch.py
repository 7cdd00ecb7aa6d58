"""CNNSplitter patching: the paper's replace-and-argmax rule and its metrics, on hand values."""

from __future__ import annotations

import math
import resource
import signal

import pytest
import torch
import torch.nn as nn

from md_plugin.errors import ConfigError
from md_plugin.splitter import PatchedModel, evaluate_patch, own_class_range, tc_metrics


class Lookup(nn.Module):
    """``x`` holds sample ids in column 0; returns fixed logits per id (plus a dummy parameter)."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.table[x[:, 0].long()] + 0 * self.dummy


# weak model: 3 classes, the target class (TC) is the last; the module: 2 strong classes, own = 1
WEAK = [[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0]]
MODULE = [[0.0, 3.0], [0.0, 4.0], [0.0, 0.0], [0.0, 9.0]]
LABELS = [0, 2, 1, 2]
RANGE = (1.0, 5.0)  # m' = (z - 1) / 4: 0.5, 0.75, -0.25, 2.0


def _patched(target_class=-1):
    return PatchedModel(Lookup(WEAK), Lookup(MODULE), target_class, 1, RANGE).eval()


def _ids():
    return torch.arange(4).view(4, 1)


def test_patch_rule_by_hand():
    out = _patched()(_ids())
    e = math.e
    expected = [
        [e**2 / (e**2 + 2), 1 / (e**2 + 2), 0.5],
        [1 / (2 + e**0.5), e**0.5 / (2 + e**0.5), 0.75],
        [1 / (1 + e + e**3), e / (1 + e + e**3), -0.25],  # unclipped below 0
        [e**5 / (e**5 + 2), 1 / (e**5 + 2), 2.0],  # unclipped above 1
    ]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # before: argmax of the weak logits 0, 1, 2, 0; after: 0, TC, 1, TC
    assert out.argmax(1).tolist() == [0, 2, 1, 2]


def test_target_class_anywhere_and_equivalent_form():
    """TC in the middle; and 'TC iff m' > max_{j != TC} p_j' on random logits."""
    w = [[r[2], r[0], r[1]] for r in WEAK]  # TC moved to index 0
    p = PatchedModel(Lookup(w), Lookup(MODULE), 0, 1, RANGE).eval()
    assert p(_ids()).argmax(1).tolist() == [1, 0, 2, 0]
    g = torch.Generator().manual_seed(0)
    logits, m = torch.randn(500, 6, generator=g) * 3, torch.randn(500, generator=g)
    pred = PatchedModel.combine(logits, m, 4).argmax(1)
    probs = torch.softmax(logits, 1)
    others = torch.cat([probs[:, :4], probs[:, 5:]], 1).max(1).values
    assert torch.equal(pred == 4, m > others)
    masked = probs.clone()
    masked[:, 4] = -1.0  # otherwise the weak model's own argmax among the other classes
    assert torch.equal(pred[pred != 4], masked.argmax(1)[pred != 4])
    assert 50 < int((pred == 4).sum()) < 450  # both branches exercised


def test_tc_metrics_by_hand():
    # TC = 2: TP at 0, 1; FP at 2 (label 0); FN at 3 (predicted 0); index 4 correct non-TC
    m = tc_metrics([2, 2, 2, 0, 1], [2, 2, 0, 2, 1], 2)
    assert (m["tp"], m["fp"], m["fn"], m["n_tc"], m["n_non_tc"]) == (2, 1, 1, 3, 2)
    assert m["tc_precision"] == pytest.approx(200 / 3)
    assert m["tc_recall"] == pytest.approx(200 / 3)
    assert m["tc_f1"] == pytest.approx(200 / 3)
    assert m["non_tc_acc"] == pytest.approx(50.0)  # the non-TC image called TC counts as wrong
    assert m["acc"] == pytest.approx(60.0)
    z = tc_metrics([0, 1], [0, 1], 2)  # TC never predicted nor present: 0, not NaN
    assert (z["tc_precision"], z["tc_recall"], z["tc_f1"], z["non_tc_acc"]) == (0, 0, 0, 100)


def test_evaluate_patch_before_after_by_hand():
    loader = [(_ids()[:2], torch.tensor(LABELS[:2])), (_ids()[2:], torch.tensor(LABELS[2:]))]
    r = evaluate_patch(_patched(), loader)
    b, a = r["before"], r["after"]
    # before: predictions 0, 1, 2, 0 -> no TP: P = R = F1 = 0; non-TC: 1 of 2 right
    assert (b["tp"], b["fp"], b["fn"]) == (0, 1, 2)
    assert (b["tc_precision"], b["tc_recall"], b["tc_f1"], b["non_tc_acc"]) == (0, 0, 0, 50)
    # after: 0, 2, 1, 2 -> every image right
    assert (a["tc_precision"], a["tc_recall"], a["tc_f1"], a["non_tc_acc"]) == (100, 100, 100, 100)


def test_patched_model_evaluates_and_saves_like_any_model(tmp_path):
    from accelerate import Accelerator

    from md_plugin.train.engine import evaluate

    p = _patched()
    loader = [(_ids(), torch.tensor(LABELS))]
    r = evaluate(p, loader, Accelerator(cpu=True), 3)
    assert r["top1"] == 100.0  # the trainer's evaluate reads the argmax of forward()
    torch.save(p.state_dict(), tmp_path / "patched.pth")
    sd = torch.load(tmp_path / "patched.pth")
    assert sd["value_range"].tolist() == [1.0, 5.0]
    fresh = PatchedModel(Lookup(WEAK), Lookup(MODULE), -1, 1, (0.0, 1.0))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.eval()(_ids()), p(_ids()))


def test_own_class_range_on_class_images_only():
    loader = [(_ids(), torch.tensor([1, 1, 0, 1]))]  # class 1 at ids 0, 1, 3: logits 3, 4, 9
    assert own_class_range(Lookup(MODULE), loader, 1) == (3.0, 9.0)
    with pytest.raises(ConfigError, match="at least two"):
        own_class_range(Lookup(MODULE), loader, 0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(value_range=(2.0, 2.0)), "max > min"),
        (dict(value_range=(0.0, float("nan"))), "finite"),
        (dict(module_class=-1), "module_class must be >= 0"),
    ],
)
def test_bad_patch_arguments_are_one_line(kw, match):
    args = dict(target_class=-1, module_class=1, value_range=RANGE) | kw
    with pytest.raises(ConfigError, match=match):
        PatchedModel(Lookup(WEAK), Lookup(MODULE), **args)


def test_out_of_range_classes_at_forward():
    with pytest.raises(ConfigError, match="target class 3 is out of range"):
        PatchedModel(Lookup(WEAK), Lookup(MODULE), 3, 1, RANGE)(_ids())
    with pytest.raises(ConfigError, match="module class 2 is out of range"):
        PatchedModel(Lookup(WEAK), Lookup(MODULE), -1, 2, RANGE)(_ids())


# ---- md-doctor patch ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch_setup(cifar10_root, tmp_path_factory):
    """Untrained weak (6 classes) and strong (5 classes) checkpoints, maps and a strong run file."""
    import timm
    import yaml

    import md_plugin  # noqa: F401

    d = tmp_path_factory.mktemp("patch")
    torch.manual_seed(0)
    weak = timm.create_model("simcnn_weak", num_classes=6)
    strong = timm.create_model("resnet20_cifar", num_classes=5)
    torch.save({"state_dict": weak.state_dict()}, d / "weak.pth.tar")
    torch.save({"state_dict": strong.state_dict()}, d / "strong.pth.tar")
    (d / "weak.txt").write_text("dog\nfrog\nhorse\nship\ntruck\nbird\n")
    (d / "strong.txt").write_text("0\n1\n2\n3\n4\n")
    run = dict(dataset="torch/cifar10", data_dir=str(cifar10_root), class_map=str(d / "strong.txt"),
               val_from_train=0.25, data_seed=0)  # fmt: skip
    (d / "args.yaml").write_text(yaml.safe_dump(run))
    argv = ["--weak-model", "simcnn_weak", "--weak-checkpoint", str(d / "weak.pth.tar"),
            "--strong-model", "resnet20_cifar", "--strong-checkpoint", str(d / "strong.pth.tar"),
            "--whole-strong", "--range-data", str(d / "args.yaml"), "--module-class", "2",
            "--dataset", "torch/cifar10", "--data-dir", str(cifar10_root), "--class-map",
            str(d / "weak.txt"), "-b", "16"]  # fmt: skip
    return d, argv, weak.eval(), strong.eval()


def test_md_doctor_patch_whole_strong_by_recomputation(patch_setup, cifar10_root, capsys):
    """The command's numbers equal a direct recomputation; the saved model reloads exactly."""
    from md_plugin.cli import main as doctor_main
    from md_plugin.data.class_map import apply_class_map
    from md_plugin.data.datasets import create_dataset, create_datasets
    from md_plugin.data.transforms import create_eval_transform
    from md_plugin.splitter.patch_cli import load_patched

    d, argv, weak, strong = patch_setup
    out = argv + ["--results", str(d / "r.json"), "--out", str(d / "patched.pth.tar")]
    assert doctor_main(["patch"] + out) == 0
    text = capsys.readouterr().out
    assert "TC precision (%)" in text and "non-TC accuracy (%)" in text
    res = __import__("json").loads((d / "r.json").read_text())
    tf = create_eval_transform(dict(input_size=(3, 32, 32), mean=strong.pretrained_cfg["mean"],
                                    std=strong.pretrained_cfg["std"], crop_pct=1.0))  # fmt: skip
    # range: the whole strong model's class-2 logit over the held-out class-2 training images
    held = create_datasets("torch/cifar10", cifar10_root, class_map=d / "strong.txt",
                           val_from_train=0.25).val  # fmt: skip
    xs = torch.stack([tf(held[i][0]) for i in range(len(held)) if held[i][1] == 2])
    with torch.no_grad():
        z = strong(xs)[:, 2]
    lo, hi = float(z.min()), float(z.max())
    assert res["patch"]["value_range"] == pytest.approx([lo, hi], rel=1e-5)
    # test split: weak classes (bird -> 5); before = weak argmax, after = the rule
    ds = apply_class_map(
        create_dataset("torch/cifar10", cifar10_root, "validation"), d / "weak.txt"
    )
    x = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        p = torch.softmax(weak(x), 1)
        m = (strong(x)[:, 2].double() - lo) / (hi - lo)
    after = p.clone()
    after[:, 5] = m.float()
    assert res["before"] == tc_metrics(p.argmax(1), y, 5)
    exp = tc_metrics(after.argmax(1), y, 5)
    assert all(res["after"][k] == pytest.approx(exp[k]) for k in exp)
    # the saved patched model rebuilds from its file alone and gives the same scores
    reloaded = load_patched(d / "patched.pth.tar")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), after, rtol=1e-5, atol=1e-6)
    # nothing is overwritten
    assert doctor_main(["patch"] + out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_md_doctor_patch_config_file(patch_setup, tmp_path, capsys):
    """YAML keys are the flags' dest names; the command line wins."""
    import yaml

    from md_plugin.cli import main as doctor_main

    d, argv, _, _ = patch_setup
    flags = dict(zip(argv[::2], argv[1::2]))  # argv pairs up until --whole-strong
    cfg = dict(
        weak_model="simcnn_weak", weak_checkpoint=str(d / "weak.pth.tar"),
        strong_model="resnet20_cifar", strong_checkpoint=str(d / "strong.pth.tar"),
        whole_strong=True, range_data=str(d / "args.yaml"), module_class=2,
        dataset="torch/cifar10", data_dir=argv[argv.index("--data-dir") + 1],
        class_map=str(d / "weak.txt"), batch_size=7,
    )  # fmt: skip
    assert flags["--weak-model"] == cfg["weak_model"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert doctor_main(["patch", "-c", str(tmp_path / "p.yaml"), "--results",
                        str(tmp_path / "r.json")]) == 0  # fmt: skip
    assert (tmp_path / "r.json").is_file()
    (tmp_path / "bad.yaml").write_text("weak_modle: simcnn_weak\n")
    assert doctor_main(["patch", "-c", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "did you mean 'weak_model'" in err[-1]


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"--module-class": "7"}, "--module-class 7 is out of range"),
        ({"--target-class": "6"}, "--target-class 6 is out of range"),
        ({"--range-data": "/nonexistent.yaml"}, "--range-data: file not found"),
        ({"--weak-checkpoint": "/nonexistent.pth"}, "not found"),
        ({"--strong-model": "resnet33_cifar"}, "unknown model"),
        ({"--whole-strong": None}, "exactly one of --modules FILE and --whole-strong"),
    ],
)
def test_md_doctor_patch_errors_are_one_line(patch_setup, capsys, change, msg):
    from md_plugin.cli import main as doctor_main

    _, argv, _, _ = patch_setup
    argv = list(argv)
    for k, v in change.items():
        if k not in argv:
            argv += [k, v]
            continue
        i = argv.index(k)
        if v is None:
            del argv[i]
        else:
            argv[i + 1] = v
    assert doctor_main(["patch"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_md_doctor_patch_with_a_modules_file(patch_setup, cifar10_root, tmp_path, capsys):
    """--modules: the module and range come from the artifact; the saved model reloads exactly;
    a modules file of another model is refused in one line."""
    import json

    import timm

    from md_plugin.cli import main as doctor_main
    from md_plugin.data.class_map import apply_class_map
    from md_plugin.data.datasets import create_dataset
    from md_plugin.data.transforms import create_eval_transform
    from md_plugin.splitter import SplitModules, create_split_graph, create_split_modules
    from md_plugin.splitter.patch_cli import load_patched

    d, argv, weak, strong = patch_setup
    tf = create_eval_transform(dict(input_size=(3, 32, 32), mean=strong.pretrained_cfg["mean"],
                                    std=strong.pretrained_cfg["std"], crop_pct=1.0))  # fmt: skip
    sg = create_split_graph(strong, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    masks = [[torch.rand(c, generator=g) < 0.6 for c in sg.num_channels] for _ in range(5)]
    mods = create_split_modules(strong, sg, list(range(5)), masks)
    held = create_dataset("torch/cifar10", cifar10_root, "train")
    x_h = torch.stack([tf(held[i][0]) for i in range(0, 200, 2)])
    y_h = torch.tensor([held[i][1] for i in range(0, 200, 2)])
    keep = y_h < 5
    mods.measure([(x_h[keep], y_h[keep])])
    mods.save(d / "mods.safetensors")
    i = argv.index("--whole-strong")
    args = argv[:i] + argv[i + 3 :] + ["--modules", str(d / "mods.safetensors"),
                                       "--results", str(tmp_path / "r.json"),
                                       "--out", str(tmp_path / "p.pth.tar")]  # fmt: skip
    assert doctor_main(["patch"] + args) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    lo, hi = mods.range(2)
    assert res["patch"]["value_range"] == pytest.approx([lo, hi])
    assert res["patch"]["module_kind"] == "masked"
    ds = apply_class_map(
        create_dataset("torch/cifar10", cifar10_root, "validation"), d / "weak.txt"
    )
    x = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        after = torch.softmax(weak(x), 1)
        after[:, 5] = ((mods.module(2)(x)[:, 2].double() - lo) / (hi - lo)).float()
    exp = tc_metrics(after.argmax(1), y, 5)
    assert all(res["after"][k] == pytest.approx(exp[k]) for k in exp)
    with torch.no_grad():
        torch.testing.assert_close(load_patched(tmp_path / "p.pth.tar")(x), after,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    # modules of another model
    other = timm.create_model("resnet32_cifar", num_classes=5).eval()
    sg2 = create_split_graph(other, (3, 32, 32))
    m2 = create_split_modules(other, sg2, [0, 1], [[torch.ones(c, dtype=torch.bool)
                                                    for c in sg2.num_channels]] * 2)  # fmt: skip
    m2.save(tmp_path / "other.safetensors")
    assert isinstance(SplitModules.load(tmp_path / "other.safetensors"), SplitModules)
    bad = args[: args.index("--results")]
    bad[bad.index("--modules") + 1] = str(tmp_path / "other.safetensors")
    assert doctor_main(["patch"] + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split from another model" in err[0]
    # --module-score: a GA split has no heads; a gradient split's head is used only when asked
    assert (
        doctor_main(["patch"] + args[: args.index("--results")] + ["--module-score", "head"]) == 2
    )
    assert "have no heads (a GA split)" in capsys.readouterr().err
    from md_plugin.splitter.head import create_module_heads

    mods.heads = create_module_heads(5, 5, seed=1).tensors()
    mods.save(d / "mods_h.safetensors")
    args_h = [a.replace("mods.safetensors", "mods_h.safetensors") for a in args]
    args_h += ["--overwrite"]
    assert doctor_main(["patch"] + args_h) == 0  # default: the own-logit range, as without heads
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["patch"]["value_range"] == pytest.approx([lo, hi])
    assert res["patch"]["module_head"] is False
    assert all(res["after"][k] == pytest.approx(exp[k]) for k in exp)
    assert doctor_main(["patch"] + args_h + ["--module-score", "head"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["patch"]["module_head"] is True and res["patch"]["value_range"] == [0.0, 1.0]
    with torch.no_grad():
        after[:, 5] = mods.module_head(2)(mods.module(2)(x))
    exp = tc_metrics(after.argmax(1), y, 5)
    assert all(res["after"][k] == pytest.approx(exp[k]) for k in exp)


def test_md_doctor_patch_refuses_modules_of_other_weights(patch_setup, tmp_path, capsys):
    """Issue 19 item 3: modules split from another resnet20_cifar (same shapes, other weights)."""
    import timm

    from md_plugin.cli import main as doctor_main
    from md_plugin.splitter import create_split_graph, create_split_modules

    d, argv, _, _ = patch_setup
    torch.manual_seed(1)
    other = timm.create_model("resnet20_cifar", num_classes=5).eval()
    sg = create_split_graph(other, (3, 32, 32))
    full = [[torch.ones(c, dtype=torch.bool) for c in sg.num_channels]] * 2
    create_split_modules(other, sg, [0, 2], full).save(tmp_path / "m.safetensors")
    i = argv.index("--whole-strong")
    args = argv[:i] + argv[i + 3 :] + ["--modules", str(tmp_path / "m.safetensors")]
    assert doctor_main(["patch"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same architecture ('resnet20_cifar') but other weights" in err[0]


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_md_doctor_patch_on_a_full_disk_is_one_line(patch_setup, tmp_path, capsys):
    """The patched model is written like a checkpoint: a failed write (EFBIG under a 64 KB
    file-size limit, as on a full disk) is one line and leaves no temporary file."""
    from md_plugin.cli import main as doctor_main

    _, argv, _, _ = patch_setup
    out = tmp_path / "p.pth.tar"
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, old_limit[1]))
    try:
        rc = doctor_main(["patch", *argv, "--results", str(tmp_path / "r.json"), "--out", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {out}" in err[0] and "disk full" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no r.json of an unsaved patch
