"""How close is a batched fine-tuning step to its matmuls, and what does DoRA cost next to LoRA?

    .venv/bin/python -m benchmarks.bench_step [--repeats 7] [--steps 20] [--seeds 10] [--threads 1]

The notebook's MLP (its SIZES, rank, alpha and batch size, read from DoRA.ipynb), one copy per
seed wrapped with the notebook's layer classes, trained by ``helpers.train`` exactly as the
notebook trains them (all seeds at once). One "step" is ``Runs.seconds`` of one epoch of
``steps`` batches divided by ``steps``: gather, forward, backward, Adam, no evaluation.
Inputs are random (timing does not depend on the digits), float32 on the CPU or
``helpers.pick_device()``.

(a) floor: the same shapes as one batched ``torch.bmm`` chain, without any adapter: for each
    layer the forward product (S, B, in) @ (S, in, out) and, except for the first layer, the
    backward product for its input (S, B, out) @ (S, out, in). Those are the large products
    every method needs (the base weights are frozen: no weight gradient; the adapters' own
    products are rank r). Goal: step / floor at most 2.
(b) DoRA / LoRA per step (textbook ``LinearWithDoRA``, efficient ``DoRALinear``).
    Goal: at most 1.15.

All variants run interleaved (v1, v2, ..., v1, v2, ...) after a warm-up, and the medians of
the repeats are reported, ratios from this one run: the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import helpers
from dora_tutorial.notebook import import_notebook_definitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (a shared machine: 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nb = import_notebook_definitions()
    device = helpers.pick_device()
    sizes, batch, seeds = tuple(nb.SIZES), nb.BATCH_SIZE, tuple(range(args.seeds))
    g = torch.Generator().manual_seed(0)
    n = args.steps * batch
    x = torch.rand(n, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    x, y = x.to(device), y.to(device)
    task = helpers.Task(x, y, x[:batch], y[:batch])  # evaluation is not timed
    pretrained = helpers.make_mlp(sizes, seed=0)
    methods = {
        "LoRA": nb.LinearWithLoRA,
        "DoRA textbook": nb.LinearWithDoRA,
        "DoRA efficient": nb.DoRALinear,
    }

    def step_seconds(wrapper) -> float:
        runs = helpers.finetune(
            pretrained,
            task,
            seeds=seeds,
            wrapper=wrapper,
            rank=nb.RANK,
            alpha=nb.ALPHA,
            lr=1e-3,
            epochs=1,
            batch_size=batch,
            log=None,
        )
        return runs.seconds[0] / args.steps

    floor = matmul_floor(sizes, len(seeds), batch, device)
    variants = {"floor (bmm chain)": floor}
    variants.update({name: lambda w=w: step_seconds(w) for name, w in methods.items()})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    print(
        f"{len(seeds)} seeds at batch {batch}, MLP {'-'.join(map(str, sizes))}, rank {nb.RANK}, "
        f"{device}, {torch.get_num_threads()} threads; median of {args.repeats} interleaved "
        f"repeats of {args.steps} steps"
    )
    for name, value in ms.items():
        spread = f"{1000 * min(times[name]):.2f}-{1000 * max(times[name]):.2f}"
        print(f"  {name:<18} {value:7.2f} ms per step  (range {spread})")
    print("(a) step / matmul floor, goal <= 2.00:")
    for name in methods:
        print(f"  {name:<18} {ms[name] / ms['floor (bmm chain)']:5.2f}x")
    print("(b) DoRA / LoRA per step, goal <= 1.15:")
    for name in list(methods)[1:]:
        print(f"  {name:<18} {ms[name] / ms['LoRA']:5.2f}x")


def matmul_floor(sizes, seeds: int, batch: int, device, steps: int = 20):
    """A function returning the seconds per step of the step's large products alone."""
    g = torch.Generator().manual_seed(1)
    shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
    weights = [torch.randn(seeds, i, o, generator=g).to(device) for i, o in shapes]
    back = [torch.randn(seeds, o, i, generator=g).to(device) for i, o in shapes]
    x = torch.randn(seeds, batch, sizes[0], generator=g).to(device)

    def run() -> float:
        helpers.sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            h = x
            for w in weights:
                h = torch.bmm(h, w)  # forward
            for w in reversed(back[1:]):
                h = torch.bmm(h, w)  # backward, gradient of each layer's input
        helpers.sync(device)
        return (time.perf_counter() - start) / steps

    return run


if __name__ == "__main__":
    main()
