"""Lazy regularisation (``ModelDoctor(every=k)``, ``--md-every k``), issue 14.

Ground truth by construction: a hand-written loop with the per-step loss (what the trainer did
before ``--md-every`` existed) and the same loop with the weight ``k * alpha`` written out on the
steps ``step % k == 0``. Powers of two for k make the scaled values exact, so most comparisons
are bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from md_plugin.doctor.treatment import ModelDoctor
from md_plugin.errors import ConfigError
from md_plugin.train.args import parse_args
from md_plugin.train.engine import TrainState, train_one_epoch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import mp_worker as w  # noqa: E402  (tiny BN-free net, its diagnosis, seeded batches)

ALPHA = 0.5


@pytest.fixture(scope="module")
def diag():
    model = w.make_model()
    return w._diagnose(model, w.diag_dataset(model))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [w.shard_batch(s, 0) for s in range(n)]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _md_grads(doctor: ModelDoctor, model: nn.Module, x, y) -> tuple[torch.Tensor, list]:
    logits = model(x)
    loss, _ = doctor.loss(logits, y)
    if not loss.requires_grad:
        return loss, [None for _ in model.parameters()]
    return loss, list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


def test_penalty_steps_carry_k_times_the_weight_and_the_others_none(diag):
    model = w.make_model()
    x, y = w.shard_batch(0, 0)
    one = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE)
    l1, g1 = _md_grads(one, model, x, y)
    one.remove()
    assert l1.item() > 0 and any(g is not None and g.abs().max() > 0 for g in g1)
    lazy = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE, every=4)
    due = [lazy.begin_step(s) for s in range(9)]
    assert due == [True, False, False, False, True, False, False, False, True]
    for step in (0, 1, 4, 6):
        assert lazy.begin_step(step) == (step % 4 == 0)
        lk, gk = _md_grads(lazy, model, x, y)
        if step % 4 == 0:  # exactly 4x the per-step loss and its gradient (4 is a power of 2)
            assert torch.equal(lk, 4 * l1)
            for a, b in zip(gk, g1):
                assert (a is None) == (b is None)
                assert a is None or torch.equal(a, 4 * b)
        else:  # nothing: zero loss outside the graph, no feature kept by the hooks
            assert lk.item() == 0.0 and not lk.requires_grad
            assert lazy.capture._features == {}
    lazy.remove()


def test_every_one_with_begin_step_is_the_per_step_loss(diag):
    model = w.make_model()
    x, y = w.shard_batch(1, 0)
    plain = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE)
    l0, g0 = _md_grads(plain, model, x, y)
    plain.remove()
    md = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE, every=1)
    for step in (0, 1, 7):
        assert md.begin_step(step)
        l1, g1 = _md_grads(md, model, x, y)
        assert torch.equal(l1, l0)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g0))
    md.remove()


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "4"])
def test_bad_every_is_refused(diag, every):
    with pytest.raises(ConfigError, match="every must be an integer >= 1"):
        ModelDoctor(w.make_model(), diag, alpha=ALPHA, input_size=w.INPUT_SIZE, every=every)


def test_lazy_loss_without_begin_step_is_an_error_not_a_silent_default(diag):
    model = w.make_model()
    md = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE, every=2)
    x, y = w.shard_batch(0, 0)
    with pytest.raises(ConfigError, match=r"call md.begin_step\(step\)"):
        md.loss(model(x), y)
    md.remove()


def _reference(diag, batches, every: int, accum: int) -> list[torch.Tensor]:
    """Hand loop: per micro-batch (CE + [step % every == 0] * every * alpha * L) / accum."""
    model = w.make_model()
    md = ModelDoctor(model, diag, alpha=ALPHA * every, input_size=w.INPUT_SIZE)
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    terms = []
    for i, (x, y) in enumerate(batches):
        step = i // accum
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if step % every == 0:
            md_loss, parts = md.loss(logits, y)
            loss = loss + md_loss
            terms.append(float(parts["md_channel"]))
        else:
            md.capture.clear()
        (loss / accum if accum > 1 else loss).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    md.remove()
    return _params(model), sum(terms) / len(terms)


def _engine(diag, batches, every: int, accum: int, num_updates: int = 0):
    from accelerate import Accelerator

    acc = Accelerator(gradient_accumulation_steps=accum)
    model = w.make_model()
    md = ModelDoctor(model, diag, alpha=ALPHA, input_size=w.INPUT_SIZE, every=every)
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    model, opt = acc.prepare(model, opt)
    args = parse_args(["--log-interval", "0", "--no-progress", "--grad-accum-steps", str(accum)])
    state = TrainState(num_updates=num_updates)
    m = train_one_epoch(0, model, batches, opt, nn.CrossEntropyLoss(), acc, args, state, doctor=md)
    md.remove()
    return _params(acc.unwrap_model(model)), m, state


@pytest.mark.parametrize("every, accum", [(1, 1), (4, 1), (2, 2)], ids=["k1", "k4", "k2-accum2"])
def test_trainer_steps_equal_the_hand_written_loop(diag, every, accum):
    """train_one_epoch with --md-every k (and gradient accumulation) = the hand loop, bit for bit;
    k=1 is the per-step loss the trainer always used."""
    batches = _batches(8)
    ref, ref_md = _reference(diag, batches, every, accum)
    got, m, state = _engine(diag, batches, every, accum)
    assert state.num_updates == 8 // accum
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if every > 1:  # and the lazy run really differs from the per-step one
        per_step, _ = _reference(diag, batches, 1, accum)
        assert max((a - b).abs().max().item() for a, b in zip(got, per_step)) > 1e-4
    # md_channel is the unweighted term averaged over the micro-batches that computed it
    assert m["md_channel"] > 0
    assert m["md_channel"] == pytest.approx(ref_md, rel=1e-12)


def test_phase_follows_the_restored_update_counter(diag):
    """Resuming at num_updates=3 with k=4: the first step is plain, the second penalised."""
    batches = _batches(2)
    got, _, state = _engine(diag, batches, 4, 1, num_updates=3)
    assert state.num_updates == 5
    # by hand: step 3 plain, step 4 (= 0 mod 4) with 4 * alpha
    model = w.make_model()
    md = ModelDoctor(model, diag, alpha=4 * ALPHA, input_size=w.INPUT_SIZE)
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    for i, (x, y) in enumerate(batches):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if i == 1:
            loss = loss + md.loss(logits, y)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    md.remove()
    for a, b in zip(got, _params(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
