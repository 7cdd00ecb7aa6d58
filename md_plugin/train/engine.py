"""One training epoch and one evaluation pass, on an ``accelerate.Accelerator``.

Each step's forward half (model, criterion, Model Doctor terms) is
:func:`md_plugin.doctor.step.treatment_step`, the step ``ModelDoctorTask`` runs too; this module
adds what only the trainer does around it. The Model Doctor terms join the classification loss
before the single ``accelerator.backward`` (the DDP-safe pattern: out-of-place
``autograd.grad(create_graph=True)`` on hooked features, then one backward). Non-finite losses or
gradients skip the step on every rank; too many in a row abort with the likely causes named;
running out of memory is one line naming the batch size. With ``--md-every k`` the terms join only
on optimizer steps where ``num_updates % k == 0`` (lazy regularisation, see
``ModelDoctor.begin_step``): the counter is the same on every rank and for every micro-batch of a
step, and restored on resume.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from tqdm.auto import tqdm

from ..doctor.step import treatment_step
from ..errors import ConfigError, MDError
from ..metrics import confusion_matrix, per_class_accuracy

__all__ = [
    "RunningSums",
    "TrainState",
    "train_one_epoch",
    "evaluate",
    "TrainingAborted",
    "StepOutOfMemory",
    "get_rng_state",
    "set_rng_state",
]

_logger = logging.getLogger("train_md")


class TrainingAborted(MDError):
    """Too many consecutive non-finite steps."""


@dataclass
class TrainState:
    """Counters that must survive a resume."""

    num_updates: int = 0
    bad_steps: int = 0  # consecutive
    skipped_total: int = 0
    stop_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    flag = torch.isfinite(value.detach().float()).all().float().reshape(1)
    if accelerator.num_processes > 1:
        flag = (
            accelerator.reduce(flag.to(accelerator.device), reduction="sum")
            / accelerator.num_processes
        )
    return bool(flag.item() == 1.0)


class RunningSums:
    """Sample-weighted sums of the logged loss terms, accumulated on the loss's device.

    Reading a loss with ``.item()`` every step is a host synchronisation on a GPU; these sums stay
    on the device (float64) and are read once, at an interruption or the end of the epoch. The
    float64 multiply-and-add per step is the one Python floats did, in the same order, so the
    totals are identical to per-step reads.
    """

    def __init__(self, init: dict[str, float]):
        self.keys = list(init)
        self._init = [float(init[k]) for k in self.keys]
        self._t: torch.Tensor | None = None

    def add(self, weight: int, values: dict[str, torch.Tensor]) -> None:
        ref = next(iter(values.values()))
        zero = torch.zeros((), dtype=torch.float64, device=ref.device)
        v = torch.stack([values[k].detach().double() if k in values else zero for k in self.keys])
        if self._t is None:
            self._t = torch.tensor(self._init, dtype=torch.float64, device=ref.device)
        self._t += v * weight

    def read(self) -> dict[str, float]:
        vals = self._t.tolist() if self._t is not None else self._init
        return dict(zip(self.keys, vals))


def running_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a train-mode forward pass updates: BatchNorm (and tracked InstanceNorm) stats.

    A skipped step must not keep them: a non-finite forward would otherwise leave NaN running
    statistics behind while the weights look fine, and the next checkpoint would carry them.
    """
    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out += [b for b in m.buffers(recurse=False) if b is not None]
    return out


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    )


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (keeps ranks in lock step)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def get_rng_state() -> dict[str, Any]:
    """Global torch/python/numpy (and CUDA) RNG states, as plain values ``weights_only`` loads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, g))
    cuda = st.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class StepOutOfMemory(ConfigError):
    """A training step ran out of memory: the batch does not fit on this device."""


# the logged loss terms, in summary.csv's column order (md_* only with --md)
_LOSS_TERMS = ("loss", "ce", "md_channel", "md_spatial", "md_irr_mass", "md_irr_share")


class _EpochTally:
    """The epoch's sample-weighted loss sums and counts, continued from an interruption.

    ``n_md`` counts the samples of the steps that computed the Model Doctor terms (all of them
    unless ``--md-every``); ``n_new`` the samples trained in this process run (throughput).
    """

    def __init__(self, partial: dict[str, Any] | None):
        sums = dict.fromkeys(_LOSS_TERMS, 0.0)
        self.n_seen = self.n_md = self.skipped = self.n_new = 0
        if partial:
            sums.update(partial.get("sums", {}))
            self.n_seen = int(partial.get("n_seen", 0))
            self.n_md = int(partial.get("n_md", self.n_seen))
            self.skipped = int(partial.get("skipped", 0))
        self.running = RunningSums(sums)

    def add(self, result: dict[str, torch.Tensor], batch_size: int) -> None:
        parts = {k: v for k, v in result.items() if k.startswith("md_")}
        self.n_seen += batch_size
        self.n_new += batch_size
        if parts:
            self.n_md += batch_size
        self.running.add(batch_size, {"loss": result["loss"], "ce": result["task_loss"], **parts})

    def snapshot(self) -> dict[str, Any]:
        """What an interrupted epoch needs to continue (``partial``), RNG state included."""
        return {
            "sums": self.running.read(),
            "n_seen": self.n_seen,
            "n_md": self.n_md,
            "skipped": self.skipped,
            "rng": get_rng_state(),
        }

    def means(self, seconds: float, num_processes: int) -> dict[str, float]:
        """Mean loss terms, throughput and skipped steps for the summary row."""
        n = max(self.n_seen, 1)
        # the MD terms are averaged over the steps that computed them (unweighted, so comparable
        # across --md-every); with --md-every 1 that is every step, n_md == n_seen
        sums = self.running.read()
        out = {k: v / (max(self.n_md, 1) if k.startswith("md_") else n) for k, v in sums.items()}
        out["img_per_s"] = self.n_new * num_processes / max(seconds, 1e-9)
        out["skipped_steps"] = self.skipped
        return out


def train_one_epoch(
    epoch: int,
    model: nn.Module,
    loader,
    optimizer,
    criterion: Callable,
    accelerator,
    args,
    state: TrainState,
    lr_scheduler=None,
    doctor=None,
    model_ema=None,
    skip_batches: int = 0,
    on_step: Callable[[int], None] | None = None,
    partial: dict[str, Any] | None = None,
    mixup_fn: Callable | None = None,
) -> dict[str, float]:
    """Train one epoch; returns mean loss terms and throughput for the summary.

    ``mixup_fn(x, y) -> (x, y)`` (timm's name) augments each batch on the device: mixup/cutmix
    make ``y`` soft [B, C] targets; Model Doctor then gets each sample's dominant label
    (:func:`md_plugin.doctor.dominant_label`).

    Resuming mid-epoch (``skip_batches`` > 0) replays the loader through the finished batches
    without training on them, so the sampler order and the augmentation randomness of the
    remaining batches are those of the uninterrupted run, then restores the RNG state saved at
    the interruption (``partial['rng']``) and the running loss sums (``partial['sums']``).
    When a stop is requested (signal handler), every rank stops after the same step and
    ``state.extra`` gets ``interrupted``, ``interrupted_step`` and ``partial``.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_step = _OptimizerStep(
        model, optimizer, criterion, doctor, accelerator, args, state, params
    )
    stats = running_stat_buffers(model)
    stats_before = [b.clone() for b in stats]  # restored when a step is skipped
    tally = _EpochTally(partial)
    n_batches = len(loader)
    show = accelerator.is_main_process and not args.no_progress and sys.stderr.isatty()
    it = _progress(loader, n_batches, f"train {epoch}", show)
    t0 = time.perf_counter()
    for step, batch in enumerate(it):
        if step < skip_batches:  # finished before the interruption: load, do not train
            if step == skip_batches - 1 and partial and partial.get("rng") is not None:
                set_rng_state(partial["rng"])
                t0 = time.perf_counter()
            continue
        x, y = batch[0], batch[1]
        fg, has = (batch[2], batch[3]) if len(batch) > 2 else (None, None)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        _copy_buffers(stats_before, stats)
        result, what = train_step(x, y, fg, has)
        if what:  # skipped: the non-finite forward pass leaves no trace in BatchNorm
            _copy_buffers(stats, stats_before)
            tally.skipped += 1
            _bad_step(state, args, epoch, step, what, accelerator)
        else:
            _count_update(state, accelerator, model, model_ema, lr_scheduler)
            tally.add(result, y.shape[0])
            if accelerator.is_main_process and args.log_interval and not show:
                _log_step(epoch, step, n_batches, args.log_interval, result, optimizer)
        if on_step is not None:
            on_step(step)
        # stop only where gradients were applied: no accumulated gradient is lost, and the
        # accumulation counter of the resumed run lines up with the uninterrupted one
        if accelerator.sync_gradients and _any_rank(accelerator, state.stop_requested):
            _record_interrupt(state, step, tally)
            break
    return tally.means(time.perf_counter() - t0, accelerator.num_processes)


def _copy_buffers(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)


@dataclass
class _OptimizerStep:
    """One micro-batch of training: the shared forward (:func:`treatment_step`), backward and,
    on a step that syncs gradients, clipping, the finite check and the optimizer update."""

    model: nn.Module
    optimizer: Any
    criterion: Callable
    doctor: Any
    accelerator: Any
    args: Any
    state: TrainState
    params: list[torch.Tensor]

    def __call__(self, x, y, fg=None, has=None) -> tuple[dict[str, torch.Tensor], str]:
        """Run the step; running out of memory becomes one line that names the batch size.

        Returns:
            The step's result (see :func:`treatment_step`) and ``''``, or why the step was
            skipped (a non-finite loss or gradient; nothing was applied).
        """
        try:
            return self._run(x, y, fg, has)
        except RuntimeError as e:
            if not _is_out_of_memory(e):
                raise
            raise StepOutOfMemory(_oom_message(x, self.args, self.doctor is not None)) from None

    def _run(self, x, y, fg, has) -> tuple[dict[str, torch.Tensor], str]:
        acc, scaler = self.accelerator, getattr(self.accelerator, "scaler", None)
        what = ""
        with acc.accumulate(self.model):
            with acc.autocast():
                # the step index is the shared update counter: every micro-batch of a step,
                # every rank and a resumed run decide alike whether the penalties are due
                result = treatment_step(
                    self.model, self.criterion, self.doctor, x, y, fg, has,
                    step=self.state.num_updates, loss_scaler=scaler,
                )  # fmt: skip
            loss = result["loss"]
            if not _all_finite(acc, loss):
                what = f"loss={loss.item()}"
            else:
                acc.backward(loss)
                if acc.sync_gradients:
                    what = _clip_and_check(acc, self.params, self.args, scaler)
                if not what:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return result, what


def _is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA; ``torch.OutOfMemoryError`` is the same class), or the
    RuntimeError the CPU and MPS allocators raise."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def _oom_message(x: torch.Tensor, args, md: bool) -> str:
    bs, accum = int(x.shape[0]), max(int(getattr(args, "grad_accum_steps", 1) or 1), 1)
    why = " (Model Doctor's double backward needs more memory than plain training)" if md else ""
    return (
        f"out of memory in a training step at batch size {bs} per process on {x.device}{why}: "
        f"lower --batch-size; -b {max(bs // 2, 1)} --grad-accum-steps {2 * accum} keeps the "
        "effective batch"
    )


def _clip_and_check(accelerator, params: list[torch.Tensor], args, scaler) -> str:
    """Clip the synced gradients as asked; returns '' or why the step must be skipped."""
    if args.clip_grad is not None and args.clip_mode == "norm":
        # the pre-clip total norm it returns doubles as the finite check: a non-finite step is
        # skipped, so its clipped gradients never apply
        gnorm = accelerator.clip_grad_norm_(params, args.clip_grad)
        gnorm = _grad_norm(params) if gnorm is None else gnorm  # DeepSpeed
        if scaler is None and not _all_finite(accelerator, gnorm):
            return "non-finite gradient"
    elif scaler is None and not _all_finite(accelerator, _grad_norm(params)):
        return "non-finite gradient"
    elif args.clip_grad is not None:  # value / agc: check first, inf clamps finite
        accelerator.unscale_gradients()
        dispatch_clip_grad(params, args.clip_grad, mode=args.clip_mode)
    return ""


def _count_update(state: TrainState, accelerator, model, model_ema, lr_scheduler) -> None:
    """After an applied step: the update counter, EMA and per-update schedule (fp16 overflow
    steps, which the scaler skipped, count as skipped)."""
    if not accelerator.sync_gradients:
        return
    if accelerator.optimizer_step_was_skipped:
        state.skipped_total += 1  # fp16 scaler overflow: normal early in training
        return
    state.bad_steps = 0
    state.num_updates += 1
    if model_ema is not None:
        model_ema.update(accelerator.unwrap_model(model), step=state.num_updates)
    if lr_scheduler is not None:
        lr_scheduler.step_update(num_updates=state.num_updates)


def _log_step(epoch: int, step: int, n_batches: int, interval: int, result, optimizer) -> None:
    if step % interval == 0 or step == n_batches - 1:
        lr = optimizer.param_groups[0]["lr"]
        _logger.info(
            "Train: %d [%d/%d] loss %.4f ce %.4f lr %.3g",
            epoch, step, n_batches, result["loss"].item(), result["task_loss"].item(), lr,
        )  # fmt: skip


def _record_interrupt(state: TrainState, step: int, tally: _EpochTally) -> None:
    """Every rank stops after ``step``: what the checkpoint needs to continue the epoch."""
    state.stop_requested = True
    state.extra["interrupted"] = True
    state.extra["interrupted_step"] = step + 1
    state.extra["partial"] = tally.snapshot()


def _bad_step(state: TrainState, args, epoch: int, step: int, what: str, accelerator) -> None:
    state.bad_steps += 1
    state.skipped_total += 1
    if accelerator.is_main_process:
        _logger.warning(
            "epoch %d step %d: %s, step skipped (%d in a row)", epoch, step, what, state.bad_steps
        )
    if state.bad_steps >= args.max_bad_steps:
        causes = []
        if getattr(args, "md", False):
            causes.append(f"--md-alpha too high ({args.md_alpha}) or --md-beta ({args.md_beta})")
        causes.append(f"learning rate too high (lr {args.lr})")
        if args.amp and args.amp_dtype == "float16":
            causes.append("fp16 overflow (try --amp-dtype bfloat16)")
        raise TrainingAborted(
            f"{state.bad_steps} consecutive non-finite steps ({what}); likely: {'; '.join(causes)}."
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    accelerator,
    num_classes: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, top-1/top-5 and per-class accuracy over the whole (gathered) eval set."""
    model.eval()
    total_loss = 0.0
    correct1 = correct5 = 0
    n = 0
    preds_all: list[torch.Tensor] = []
    targets_all: list[torch.Tensor] = []
    k5 = min(5, num_classes)
    for batch in _progress(loader, len(loader), "eval", progress):
        x, y = batch[0], batch[1]
        with accelerator.autocast():
            logits = model(x)
        logits, y = accelerator.gather_for_metrics((logits.float(), y))
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(k5, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += y.numel()
        preds_all.append(top[:, 0].cpu())
        targets_all.append(y.cpu())
    if n == 0:
        raise MDError("the evaluation set is empty")
    cm = confusion_matrix(torch.cat(preds_all), torch.cat(targets_all), num_classes)
    pc = per_class_accuracy(cm)
    return {
        "loss": total_loss / n,
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "per_class": [float(v) * 100.0 if not math.isnan(float(v)) else float("nan") for v in pc],
        "confusion": cm,
        "count": n,
    }
