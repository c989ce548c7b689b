"""What does training the seeds of one configuration together save?

    .venv/bin/python -m benchmarks.bench_seeds [--epochs 1] [--seeds 1 3 10]

The notebook's network, pretrained as the notebook does, fine-tuned on its rotated-digits task
(settings read from DoRA.ipynb) for one epoch, per method (full fine-tuning, LoRA, DoRA
textbook, DoRA efficient):

* solo: S runs one after another, one seed each (``helpers.finetune(seeds=(k,))``);
* batched: one run of S seeds at once (``helpers.finetune(seeds=range(S))``), as the notebook
  trains them.

Both use the same code (``helpers.train``), so the ratio is what batching saves: per-step
overhead on a CPU, idle parallel units on a GPU. Seconds include each epoch's evaluation on the
test set. One run, ratios from that run: the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import helpers
from dora_tutorial.notebook import import_notebook_definitions, protocol
from experiments.lr_sweep import tasks

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 10])
    args = parser.parse_args()
    nb = import_notebook_definitions()
    p = protocol(nb)
    device = helpers.pick_device()
    mnist, rotated = tasks(p, device)  # as the notebook builds them
    pretrained = helpers.make_mlp(nb.SIZES, seed=0)
    nb.train_one_model(pretrained, mnist, p["PRETRAIN_EPOCHS"], p["PRETRAIN_LR"], p["BATCH_SIZE"])
    methods = {
        "full FT": None,
        "LoRA": nb.LinearWithLoRA,
        "DoRA textbook": nb.LinearWithDoRA,
        "DoRA efficient": nb.DoRALinear,
    }

    def seconds(wrapper, seeds) -> float:
        return helpers.timed(lambda: finetune(wrapper, seeds), device)[0]

    def finetune(wrapper, seeds):
        return helpers.finetune(
            pretrained,
            rotated,
            seeds=seeds,
            wrapper=wrapper,
            rank=nb.RANK,
            alpha=nb.ALPHA,
            lr=1e-3,
            epochs=args.epochs,
            batch_size=nb.BATCH_SIZE,
            log=None,
        )

    print(f"device {device}, {args.epochs} epoch(s) of {nb.FT_TRAIN_SIZE:,} examples")
    print(f"{'method':<16}{'S':>4}{'solo s':>10}{'batched s':>11}{'batched / solo':>16}")
    for name, wrapper in methods.items():
        seconds(wrapper, (0,))  # warm-up
        for count in args.seeds:
            solo = sum(seconds(wrapper, (k,)) for k in range(count))
            together = seconds(wrapper, range(count))
            print(f"{name:<16}{count:>4}{solo:>10.2f}{together:>11.2f}{together / solo:>16.2f}")


if __name__ == "__main__":
    main()
