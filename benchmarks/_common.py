"""Shared helpers for the benchmarks: environment, interleaved timing, CPU peak memory."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def machine_info(device: torch.device | None = None) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import timm

    gpu = None
    if device is not None and device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return {
        "cpu": cpu,
        "gpu": gpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class Precision:
    """fp32, bf16 or fp16 training steps on one device, as the trainer runs them.

    bf16: autocast only. fp16: autocast plus a ``GradScaler`` (loss scaled before backward,
    the step skipped on overflow), and the Model Doctor cotangents scaled by the same factor
    (``grad_scale``, PyTorch's AMP gradient-penalty recipe).
    """

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, name: str, device: torch.device):
        if name not in self.DTYPES:
            raise ValueError(f"precision must be one of {list(self.DTYPES)}, got {name!r}")
        self.name = name
        self.device = device
        self.dtype = self.DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.name != "fp32")

    def grad_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Backward and optimizer step (through the scaler under fp16)."""
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()


def add_device_args(ap, amp_help: str = "comma list of precisions: fp32, bf16, fp16") -> None:
    """``--device`` and ``--amp``, the same in every benchmark (the GPU script passes both)."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--amp", default="fp32", help=amp_help)


def parse_device_args(ap, args) -> torch.device:
    """Turn ``--amp`` into a list of precisions and ``--device`` into a device, or exit in one line."""
    args.amp = [v for v in args.amp.split(",") if v]
    if any(v not in Precision.DTYPES for v in args.amp):
        ap.error(f"--amp takes {','.join(Precision.DTYPES)}, got {args.amp}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers what the step launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above the start (CUDA allocator or CPU profiler)."""
    if device.type != "cuda":
        return peak_bytes(fn)
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Time each callable once per round, all in the same round back to back.

    The order rotates every round so no variant always runs right after another one. Returns
    the wall times (s) of the ``rounds`` measured rounds (``warmup`` rounds are discarded).
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return times


def ratio_stats(times: dict[str, list[float]], base: str = "plain") -> dict[str, dict]:
    """Per variant: median time, and the median / min / max of the per-round ratio to ``base``."""
    out = {}
    for n, ts in times.items():
        rs = [t / b for t, b in zip(ts, times[base])]
        out[n] = {
            "median_s": statistics.median(ts),
            "ratio": statistics.median(rs),
            "ratio_min": min(rs),
            "ratio_max": max(rs),
            "cv": statistics.pstdev(ts) / statistics.mean(ts),
        }
    return out


def peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes allocated through PyTorch's CPU allocator while ``fn`` runs, above the start.

    Uses the profiler's allocation/free events (``profile_memory=True``) and a running sum in
    time order. Memory that exists before ``fn`` (parameters, optimizer state, inputs) is not
    counted; blocks allocated before and freed inside ``fn`` are invisible to the profiler, so
    call it when no autograd graph or gradient from an earlier step is alive. Allocations that
    bypass the c10 allocator (oneDNN's internal scratch, Python objects) are not seen either.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines (file descriptor 2) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def fmt_ratio(s: dict) -> str:
    return f"{s['ratio']:.2f}x ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"
