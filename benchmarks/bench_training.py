"""Training speed: a batched fine-tuning step against its matmuls, and seeds trained together.

    .venv/bin/python -m benchmarks.bench_training step [--repeats 7] [--steps 20] [--threads 1]
    .venv/bin/python -m benchmarks.bench_training seeds [--epochs 1] [--seeds 1 3 10]

step: ten copies of the notebook's MLP (its SIZES, RANK, ALPHA, BATCH_SIZE), wrapped with the
notebook's layers and trained by ``helpers.finetune`` as the notebook trains them, on random
inputs; a step is one epoch of ``steps`` batches over ``steps``. The floor is the step's large
products alone, one ``torch.bmm`` chain (forward, and backward to each layer's input: the base
is frozen), goal step / floor <= 2; DoRA / LoRA goal <= 1.15.

seeds: the notebook's pretrained MLP fine-tuned on its rotated digits, S runs one seed each
against one run of S seeds at once (the same ``helpers.train``): what batching saves.
"""

from __future__ import annotations

import argparse

import torch

import helpers
from benchmarks.common import interleaved, setup
from dora_tutorial.notebook import protocol
from experiments.common import tasks


def methods(nb) -> dict:
    return {
        "LoRA": nb.LinearWithLoRA,
        "DoRA textbook": nb.LinearWithDoRA,
        "DoRA efficient": nb.DoRALinear,
    }


def finetune(nb, pretrained, task, wrapper, seeds, epochs=1):
    kw = dict(
        rank=nb.RANK, alpha=nb.ALPHA, lr=1e-3, epochs=epochs, batch_size=nb.BATCH_SIZE, log=None
    )
    return helpers.finetune(pretrained, task, seeds=seeds, wrapper=wrapper, **kw)


def step(nb, device, args) -> None:
    sizes, batch, n = tuple(nb.SIZES), nb.BATCH_SIZE, args.steps * nb.BATCH_SIZE
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, sizes[0], generator=g).to(device)
    y = torch.randint(0, sizes[-1], (n,), generator=g).to(device)
    task = helpers.Task(x, y, x[:batch], y[:batch])  # evaluation is not timed
    pretrained, seeds = helpers.make_mlp(sizes, seed=0), tuple(range(args.seeds))
    shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
    forward = [torch.randn(len(seeds), i, o, generator=g).to(device) for i, o in shapes]
    backward = [w.transpose(1, 2).contiguous() for w in forward[1:]]
    inputs = torch.randn(len(seeds), batch, sizes[0], generator=g).to(device)

    def floor() -> float:
        def chain():
            for _ in range(args.steps):
                h = inputs
                for w in [*forward, *reversed(backward)]:
                    h = torch.bmm(h, w)

        return helpers.timed(chain, device)[0] / args.steps

    cases = {"floor (bmm chain)": floor}
    for name, wrapper in methods(nb).items():
        cases[name] = lambda w=wrapper: (
            finetune(nb, pretrained, task, w, seeds).seconds[0] / args.steps
        )
    ms = {name: 1000 * s for name, s in interleaved(cases, args.repeats).items()}
    print(
        f"{len(seeds)} seeds at batch {batch}, MLP {'-'.join(map(str, sizes))}, rank {nb.RANK}; "
        f"median of {args.repeats} interleaved repeats of {args.steps} steps"
    )
    for name, value in ms.items():
        print(f"  {name:<18} {value:7.2f} ms per step")
    print("(a) step / matmul floor, goal <= 2.00:")
    for name in methods(nb):
        print(f"  {name:<18} {ms[name] / ms['floor (bmm chain)']:5.2f}x")
    print("(b) DoRA / LoRA per step, goal <= 1.15:")
    for name in list(methods(nb))[1:]:
        print(f"  {name:<18} {ms[name] / ms['LoRA']:5.2f}x")


def seeds(nb, device, args) -> None:
    p = protocol(nb)
    mnist, rotated = tasks(p, device)  # as the notebook builds them
    pretrained = helpers.make_mlp(nb.SIZES, seed=0)
    nb.train_one_model(pretrained, mnist, p["PRETRAIN_EPOCHS"], p["PRETRAIN_LR"], p["BATCH_SIZE"])

    def seconds(wrapper, seeds) -> float:
        run = lambda: finetune(nb, pretrained, rotated, wrapper, seeds, args.epochs)  # noqa: E731
        return helpers.timed(run, device)[0]

    print(f"{args.epochs} epoch(s) of {nb.FT_TRAIN_SIZE:,} examples")
    print(f"{'method':<16}{'S':>4}{'solo s':>10}{'batched s':>11}{'batched / solo':>16}")
    for name, wrapper in {"full FT": None, **methods(nb)}.items():
        seconds(wrapper, (0,))  # warm-up
        for count in args.seeds:
            solo = sum(seconds(wrapper, (k,)) for k in range(count))
            together = seconds(wrapper, range(count))
            print(f"{name:<16}{count:>4}{solo:>10.2f}{together:>11.2f}{together / solo:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["step", "seeds"])
    parser.add_argument("--repeats", type=int, default=7, help="step: timed repeats")
    parser.add_argument("--steps", type=int, default=20, help="step: batches per timed epoch")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (a shared machine: 1)")
    parser.add_argument("--epochs", type=int, default=1, help="seeds: epochs per run")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="step: seeds at once (10); seeds: S to compare (1 3 10)",
    )
    args = parser.parse_args()
    nb, device = setup(args.threads)
    if args.which == "step":
        args.seeds = args.seeds[0] if args.seeds else 10
        step(nb, device, args)
    else:
        args.seeds = args.seeds or [1, 3, 10]
        seeds(nb, device, args)


if __name__ == "__main__":
    main()
