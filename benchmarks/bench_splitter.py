"""Splitter cost: module evaluation throughput (masked vs extracted) and GA time per generation.

    OMP_NUM_THREADS=1 python benchmarks/bench_splitter.py --model resnet20_cifar --keep 0.3 0.5 0.7
    OMP_NUM_THREADS=1 python benchmarks/bench_splitter.py --generations 2 --population 20 \
        --val-images 500 --classes 5        # search seconds per generation at that budget

Throughput: a module keeping a fraction ``keep`` of every group's channels (random, seeded) is
run over ``--images`` random 32x32 images in batches of ``-b``, as the masked strong model
(same cost as the full model) and as the physically extracted narrower network (extraction
time included, as in the search). The search part times ``run_search`` on random images with
a random-init model: the time per generation depends on the budget and the model, not on the
weights. Prints one line per measurement and the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import md_plugin  # noqa: E402,F401
from md_plugin.splitter import (  # noqa: E402
    SearchConfig,
    create_gene_layout,
    create_masked_model,
    create_split_graph,
    extract_module,
    run_search,
)
from md_plugin.splitter.search import ModuleEvaluator  # noqa: E402


def _throughput(fn, x: torch.Tensor, batch: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            fn_net = fn()
            for s in range(0, len(x), batch):
                fn_net(x[s : s + batch])
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20_cifar")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("-b", "--batch-size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--generations", type=int, default=2, help="0 skips the search timing")
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--classes", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, model {args.model}")
    model = timm.create_model(args.model, num_classes=10).eval()
    sg = create_split_graph(model, (3, 32, 32))
    x = torch.randn(args.images, 3, 32, 32)
    full = _throughput(lambda: model, x, args.batch_size, args.repeats)
    print(f"strong model: {full:.0f} img/s")
    g = torch.Generator().manual_seed(0)
    for keep in args.keep:
        masks = []
        for grp in sg.groups:
            m = torch.zeros(grp.channels, dtype=torch.bool)
            m[torch.randperm(grp.channels, generator=g)[: max(1, round(keep * grp.channels))]] = (
                True
            )
            masks.append(m)
        masked_net = create_masked_model(sg, masks)
        masked = _throughput(lambda: masked_net, x, args.batch_size, args.repeats)  # noqa: B023
        extracted = _throughput(lambda: extract_module(sg, masks), x, args.batch_size, args.repeats)  # noqa: B023
        t = time.perf_counter()
        for _ in range(20):
            extract_module(sg, masks)
        ext_ms = (time.perf_counter() - t) / 20 * 1e3
        print(
            f"keep {keep:.0%} of every group: masked {masked:.0f} img/s, extracted {extracted:.0f} "
            f"img/s ({extracted / masked:.2f}x; extraction {ext_ms:.1f} ms per module)"
        )
    if args.generations <= 0:
        return
    n = args.classes
    orders = [[torch.randperm(c, generator=g) for c in sg.num_channels] for _ in range(n)]
    layout = create_gene_layout(sg.num_channels, orders)
    xv = torch.randn(args.val_images, 3, 32, 32)
    y = np.arange(args.val_images) % n
    for mode in ("extracted", "masked"):
        cfg = SearchConfig(generations=args.generations, population=args.population,
                           val_images=args.val_images, eval_mode=mode)  # fmt: skip
        ev = ModuleEvaluator(sg, xv, list(range(n)), mode, args.batch_size)
        t = time.perf_counter()
        run_search(layout, ev, y, cfg, log=lambda s: None)
        per_gen = (time.perf_counter() - t) / args.generations
        print(
            f"search ({mode}): {per_gen:.1f} s per generation ({n} classes x population "
            f"{args.population} x {args.val_images} val images; the first generation evaluates "
            f"every solution, later ones only the {args.population - cfg.n_keep} new ones)"
        )


if __name__ == "__main__":
    main()
