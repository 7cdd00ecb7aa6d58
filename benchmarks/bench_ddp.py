#!/usr/bin/env python3
"""A 2-process DDP training step with and without the Model Doctor terms.

Run under torchrun (one process per GPU; ``--device cpu`` uses gloo, for the dry run)::

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_ddp.py --device cuda

Each rank holds its own shard of the batch (``--batch-size`` per rank) and runs, interleaved
round by round: ``plain`` (forward, CE, backward with DDP's gradient all-reduce, SGD step),
``ours`` (the same with ``ModelDoctor.loss`` on the unwrapped model, the DDP-safe pattern) and
``every_k`` (a cycle of k steps with ``ModelDoctor(every=k)``, time / k). Rank 0 prints the ratio
table (median over rounds of the per-round ratio to ``plain``) and the global img/s. The ranks
need no communication to agree on the lazy steps: the step index decides. Last line:
``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import md_plugin  # noqa: E402,F401
from benchmarks._common import (  # noqa: E402
    Precision,
    fmt_ratio,
    interleaved,
    machine_info,
    ratio_stats,
    synchronize,
)
from benchmarks.bench_treatment import (  # noqa: E402
    ALPHA_OFF,
    MODEL_KWARGS,
    NUM_CLASSES,
    PRESETS,
    random_diagnosis,
)
from benchmarks.naive_reference import map_official_to_ours  # noqa: E402
from md_plugin.doctor.treatment import ModelDoctor  # noqa: E402
from md_plugin.layers import resolve_layers  # noqa: E402


def time_layer(ddp, model, opt, x, y, layer: str, prec, ks: list[int], args) -> dict:
    """Interleaved plain / Model Doctor / every-k steps through ``ddp``; ratio statistics."""
    s, b = args.input_size, x.shape[0]
    refs = resolve_layers(model, [layer], (3, s, s))
    diag = random_diagnosis(model, refs, torch.Generator().manual_seed(1))
    alpha, _ = map_official_to_ours(ALPHA_OFF, 0.0, b)
    mds = {1: ModelDoctor(model, diag, alpha, input_size=(3, s, s))}
    for k in ks:
        mds[k] = ModelDoctor(model, diag, alpha, every=k, input_size=(3, s, s))

    def step(k: int | None, i: int = 0) -> None:
        for kk, md in mds.items():
            md.capture.enabled = kk == k
        opt.zero_grad(set_to_none=True)
        due = k is not None and mds[k].begin_step(i)
        with prec.autocast():
            logits = ddp(x)
            loss = F.cross_entropy(logits, y)
            if due:
                loss = loss + mds[k].loss(logits, y, grad_scale=prec.grad_scale())[0]
        prec.step(loss, opt)

    def run(k: int | None):
        def fn() -> None:
            for i in range(k or 1):
                step(k, i)
            synchronize(x.device)

        return fn

    fns = {"plain": run(None), "ours": run(1), **{f"every_{k}": run(k) for k in ks}}
    times = interleaved(fns, args.steps, args.warmup)
    for k in ks:
        times[f"every_{k}"] = [t / k for t in times[f"every_{k}"]]
    for md in mds.values():
        md.remove()
    return ratio_stats(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="resnet32_cifar")
    ap.add_argument("--layers", default=None, help="comma list (default: the model's presets)")
    ap.add_argument("--batch-size", type=int, default=128, help="per rank")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--md-every", default="4")
    ap.add_argument("--amp", default="fp32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    ks = sorted({int(v) for v in args.md_every.split(",") if v and int(v) > 1})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    if rank == 0:
        print("machine:", json.dumps(info), f"world {world}")
    t_start = time.perf_counter()
    results = {}
    s, b = args.input_size, args.batch_size
    for model_name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)  # same initial weights on every rank
        model = timm.create_model(
            model_name, num_classes=NUM_CLASSES, **MODEL_KWARGS.get(model_name, {})
        )
        model.train().to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None
        )
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        x = torch.randn(b, 3, s, s, generator=gen).to(device)
        y = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device)
        layers = args.layers.split(",") if args.layers else PRESETS.get(model_name, ["last_conv"])
        rows = []
        for prec_name in [p for p in args.amp.split(",") if p]:
            prec = Precision(prec_name, device)
            for layer in layers:
                stats = time_layer(ddp, model, opt, x, y, layer, prec, ks, args)
                for st in stats.values():
                    st["img_s"] = b * world / st["median_s"]
                rows.append({"layer": layer, "precision": prec_name, "time": stats})
                if rank == 0:
                    cells = "  ".join(f"{n} {fmt_ratio(st)}" for n, st in stats.items())
                    print(
                        f"  {model_name} {prec_name} {layer}: plain "
                        f"{stats['plain']['img_s']:.0f} img/s, ours {stats['ours']['img_s']:.0f} "
                        f"img/s | {cells}",
                        flush=True,
                    )
        results[model_name] = rows
    # every rank checks that DDP kept the replicas identical through the lazy steps
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).float()
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = bool(torch.equal(flat, ref))
    ok = torch.tensor([1.0 if same else 0.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"replicas identical after the run: {bool(ok.item() == 1.0)}")
        summary = {
            "bench": "ddp",
            "world": world,
            "machine": info,
            "args": vars(args),
            "wall_s": round(time.perf_counter() - t_start, 1),
            "replicas_identical": bool(ok.item() == 1.0),
            "results": results,
        }
        print("RESULT " + json.dumps(summary, separators=(",", ":")))
    dist.destroy_process_group()
    return 0 if ok.item() == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
