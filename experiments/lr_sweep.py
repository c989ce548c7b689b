"""Where the notebook's learning rates come from: a small sweep on the same rotated-digits task.

    .venv/bin/python experiments/lr_sweep.py [--seeds 2]

Pretrains the notebook's MLP exactly as the notebook does (same seed, epochs, batch size), then
fine-tunes with full fine-tuning, LoRA and DoRA (rank 4, alpha 8) at several Adam learning rates,
with the notebook's protocol (10,000 rotated digits, 4 epochs, batch 128), and prints the final
test accuracy (mean +- std over seeds) per method and rate, also saved to
experiments/lr_sweep.txt. The notebook uses 1e-3 for full
fine-tuning and 5e-3 for LoRA and DoRA. Accuracy only: timings here mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import helpers  # noqa: E402

RATES = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
RESULTS = Path(__file__).with_name("lr_sweep.txt")  # the notebook prints this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    nb = helpers.import_notebook_definitions()
    data = helpers.load_mnist()
    mnist = helpers.make_task(*data)
    rotated = helpers.make_task(*data, degrees=45, n_train=10_000, seed=0)
    pretrained = helpers.make_mlp((784, 128, 256, 10), seed=0)
    helpers.train(pretrained, mnist, epochs=3, lr=1e-3, batch_size=128, seed=0, log=None)
    methods = {"full FT": None, "LoRA": nb.LinearWithLoRA, "DoRA": nb.LinearWithDoRA}
    lines = [f"{'lr':>8}" + "".join(f"{name:>24}" for name in methods)]
    print(lines[0], flush=True)
    for lr in RATES:
        cells = []
        for wrapper in methods.values():
            runs = [
                helpers.finetune(
                    pretrained,
                    rotated,
                    wrapper=wrapper,
                    rank=4,
                    alpha=8,
                    seed=seed,
                    lr=lr,
                    epochs=4,
                    batch_size=128,
                    log=None,
                )
                for seed in range(args.seeds)
            ]
            cells.append(helpers.summary(runs))
        lines.append(f"{lr:>8.0e}" + "".join(f"{cell:>24}" for cell in cells))
        print(lines[-1], flush=True)
    helpers.write_atomic(RESULTS, [("\n".join(lines) + "\n").encode()])
    print(f"saved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
