"""ModelDoctorTask in a timm.task loop, the public API, soft targets and train-only hooks."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.task import ClassificationTask, resume_task_checkpoint

from md_plugin import ConfigError, Diagnosis, MDError, ModelDoctor, ModelDoctorTask, diagnose

K = 4
SIZE = (3, 16, 16)


def _data(n=64, seed=0):
    """Class-coloured noise: a tiny CNN learns it in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    base = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, -1, 1], [1, 1, -1]])[y]
    x = base[:, :, None, None] + torch.randn(n, *SIZE, generator=g)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """resnet20_cifar fitted for a few steps, and its diagnosis at its last conv."""
    torch.manual_seed(0)
    m = timm.create_model("resnet20_cifar", num_classes=K)
    x, y = _data()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    diag = diagnose(m, [(x[:32], y[:32]), (x[32:], y[32:])], "last_conv", K, per_class=8)
    return m, diag


def _grads(m):
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


def test_task_step_equals_the_library_model_doctor(trained):
    base, diag = trained
    x, y = _data(16, seed=1)
    a, b = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    task = ModelDoctorTask(a, diag, alpha=0.3, criterion=torch.nn.CrossEntropyLoss())
    res = task(x, y)
    assert set(res) >= {"loss", "output", "task_loss", "md_channel", "md_spatial"}
    res["loss"].backward()

    md = ModelDoctor(b, diag, alpha=0.3)
    logits = b(x)
    ce = F.cross_entropy(logits, y)
    md_loss, parts = md.loss(logits, y)
    (ce + md_loss).backward()
    assert res["loss"].item() == pytest.approx((ce + md_loss).item(), abs=1e-6)
    assert res["md_channel"].item() == pytest.approx(parts["md_channel"].item(), abs=1e-6)
    assert res["md_channel"] > 0
    torch.testing.assert_close(_grads(a), _grads(b), rtol=0, atol=1e-6)
    # the penalty trains: its gradient is not the plain classification gradient
    c = copy.deepcopy(base).train()
    ClassificationTask(c, torch.nn.CrossEntropyLoss(), verbose=False)(x, y)["loss"].backward()
    assert (_grads(a) - _grads(c)).abs().max() > 1e-4
    md.remove()


def test_short_timm_style_loop_lowers_loss_and_the_penalty(trained):
    base, diag = trained
    m = copy.deepcopy(base)
    task = ModelDoctorTask(m, diag, alpha=0.5, criterion=torch.nn.CrossEntropyLoss())
    task.setup_ema(decay=0.9)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.02, momentum=0.9)
    x, y = _data(64, seed=2)
    task.get_trainable_module().train()
    hist = []
    for step in range(12):
        i = slice((step % 4) * 16, (step % 4 + 1) * 16)
        res = task(x[i], y[i])
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        task.update_ema(step=step)
        hist.append((res["loss"].item(), res["md_channel"].item()))
    first = sum(h[0] for h in hist[:4]) / 4
    last = sum(h[0] for h in hist[-4:]) / 4
    assert last < first
    assert sum(h[1] for h in hist[-4:]) < sum(h[1] for h in hist[:4])
    # evaluation: no penalty terms, nothing captured, EMA copy carries no doctor hooks
    task.get_trainable_module().eval()
    with torch.no_grad():
        ev = task(x[:8], y[:8])
    assert set(ev) == {"loss", "output", "task_loss"}
    assert task.doctor.capture._features == {}
    ema = task.get_trainable_module(ema=True).module
    target = dict(ema.named_modules())[diag.layer_names[0]]
    assert not target._forward_hooks and not ema._forward_pre_hooks
    ema(x[:2])  # the EMA forward does not touch the live capture
    task.doctor.remove()


def test_checkpoint_helpers_round_trip_and_refuse_another_diagnosis(trained, tmp_path):
    base, diag = trained
    task = ModelDoctorTask(copy.deepcopy(base), diag, alpha=0.1, verbose=False)
    state = task.get_checkpoint_state()
    assert set(state) == {"state_dict", "task_state"}
    assert state["task_state"]["md_layers"] == diag.layer_names
    torch.save({**state, "epoch": 3, "version": 2}, tmp_path / "ck.pth.tar")
    fresh = timm.create_model("resnet20_cifar", num_classes=K)
    task2 = ModelDoctorTask(fresh, diag, alpha=0.1, verbose=False)
    assert resume_task_checkpoint(task2, str(tmp_path / "ck.pth.tar"), log_info=False) == 4
    for p, q in zip(base.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(p, q)
    other = diag.remask("topk", topk=1)
    task3 = ModelDoctorTask(
        timm.create_model("resnet20_cifar", num_classes=K), other, verbose=False
    )
    with pytest.raises(MDError, match="another diagnosis"):
        resume_task_checkpoint(task3, str(tmp_path / "ck.pth.tar"), log_info=False)


def test_task_refuses_wrappers_that_break_double_backward(trained):
    base, diag = trained
    task = ModelDoctorTask(copy.deepcopy(base), diag, verbose=False)
    with pytest.raises(ConfigError, match="static_graph"):
        task.prepare_distributed(static_graph=True)
    with pytest.raises(ConfigError, match="torch.compile"):
        task.compile()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prepare_distributed_wraps_in_ddp_and_matches_single_process(trained):
    import torch.distributed as dist

    base, diag = trained
    x, y = _data(8, seed=3)
    ref = ModelDoctorTask(copy.deepcopy(base).train(), diag, alpha=0.3, verbose=False)
    ref(x, y)["loss"].backward()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        task = ModelDoctorTask(copy.deepcopy(base).train(), diag, alpha=0.3, verbose=False)
        task.prepare_distributed()
        assert isinstance(task.get_trainable_module(), torch.nn.parallel.DistributedDataParallel)
        res = task(x, y)
        res["loss"].backward()
        assert res["md_channel"] > 0
        torch.testing.assert_close(
            _grads(task.get_trainable_module().module),
            _grads(ref.trainable_module),
            atol=1e-6,
            rtol=0,
        )
    finally:
        dist.destroy_process_group()


def test_soft_and_mixup_targets_use_the_dominant_label(trained):
    base, diag = trained
    m = copy.deepcopy(base).train()
    md = ModelDoctor(m, diag, alpha=1.0)
    x, y = _data(8, seed=4)
    y2 = y.flip(0)
    for lam, dominant in ((0.7, y), (0.3, y2)):
        soft = mixup_target(y, K, lam, smoothing=0.1)
        assert torch.equal(soft.argmax(1), torch.where(y == y2, y, dominant))
        a = md.loss(m(x), soft)[1]["md_channel"]
        b = md.loss(m(x), soft.argmax(1))[1]["md_channel"]
        assert a.item() == b.item() > 0
    # through the task with timm's soft-target loss
    task = ModelDoctorTask(m, diag, alpha=1.0, criterion=SoftTargetCrossEntropy(), verbose=False)
    res = task(x, mixup_target(y, K, 0.6, 0.1))
    res["loss"].backward()
    assert res["md_channel"] > 0
    for bad, msg in (
        (torch.zeros(8, K + 1), r"soft targets must be \[batch, classes\]"),
        (torch.zeros(8), "must be integers"),
        (torch.full((8,), K), r"must be in \[0, 3\]"),
        (torch.zeros(8, K, 2), "targets must be class indices"),
    ):
        with pytest.raises(ConfigError, match=msg):
            md.loss(m(x), bad)
    md.remove()
    task.doctor.remove()


def test_hooks_capture_only_in_training_mode(trained):
    base, diag = trained
    m = copy.deepcopy(base)
    md = ModelDoctor(m, diag, alpha=1.0)
    x, y = _data(4, seed=5)
    m.eval()
    with torch.no_grad():
        out = m(x)
    assert md.capture._features == {}
    with pytest.raises(RuntimeError, match="captures only in training mode"):
        md.loss(out, y)
    m.train()
    assert md.loss(m(x), y)[1]["md_channel"] > 0
    md.remove()
    md2 = ModelDoctor(m, diag, alpha=1.0, capture_eval=True)
    m.eval()
    assert md2.loss(m(x), y)[1]["md_channel"] > 0
    md2.remove()


def test_input_size_comes_from_the_data():
    """resnet18's last conv with a spatial map is layer3's at 32 px and layer4's at 64 px."""
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=K, zero_init_last=False).eval()
    for px, layer in ((32, "layer3.1.conv2"), (64, "layer4.1.conv2")):
        x = torch.randn(4, 3, px, px)
        y = m(x).argmax(1)
        d = diagnose(m, [(x, y)], "last_conv", K, per_class=2)
        assert d.layer_names == [layer] and d.options["input_size"] == [3, px, px]
    # a diagnosis without a recorded size: the doctor binds at the first forward pass
    d.options.pop("input_size")
    md = ModelDoctor(m, d, alpha=1.0)
    assert md.capture is None
    m.train()
    x = torch.randn(2, 3, 64, 64)
    assert md.loss(m(x), torch.tensor([0, 1]))[1]["md_channel"].item() >= 0
    assert md.layers[0].out_shape[-2:] == (2, 2)
    md.remove()


def test_vit_needs_the_data_size_not_the_pretrained_cfg_size():
    """A ViT built for 32 px cannot run at its pretrained_cfg's 224: both calls trace at 32."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=K)
    m.eval()
    x = torch.randn(4, 3, 32, 32)
    y = m(x).argmax(1)
    d = diagnose(m, [(x, y)], "blocks.0", K, per_class=2)
    md = ModelDoctor(m, d, alpha=1.0)
    m.train()
    md.loss(m(x), y)[0].backward()
    md.remove()


def test_public_api_and_a_cheap_import():
    import md_plugin

    for name in md_plugin.__all__:
        assert getattr(md_plugin, name) is not None
    code = (
        "import sys, timm; before = set(sys.modules); import md_plugin; "
        "extra = sorted(m for m in set(sys.modules) - before if not m.startswith('md_plugin')); "
        "mine = sorted(m for m in sys.modules if m.startswith('md_plugin')); print(extra, mine)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    extra, mine = out.stdout.strip().split("] [")
    assert extra == "[", f"import md_plugin pulled in more than timm: {extra}]"
    assert "md_plugin.task" not in mine and "md_plugin.losses" not in mine


def test_diagnosis_loads_from_a_path_in_the_task(trained, tmp_path):
    base, diag = trained
    path = diag.save(tmp_path / "d.safetensors")
    task = ModelDoctorTask(copy.deepcopy(base), str(path), alpha=0.2, verbose=False)
    assert isinstance(task.doctor.diagnosis, Diagnosis)
    assert task.doctor.layers[0].name == diag.layer_names[0]
