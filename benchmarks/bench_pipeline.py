"""How much faster is one epoch with the project's data pipeline than with the tutorial one?

Both pipelines train the notebook's MLP (its SIZES, same seed, Adam lr 1e-3) for one epoch
on MNIST's 60,000 training images, then make one accuracy pass over the same training set. The
clock covers exactly that (training + accuracy pass); building the dataset is excluded on both
sides (its one-time cost is printed separately).

(a) tutorial: the pipeline popular tutorials use. ``datasets.MNIST(transform=ToTensor())``
    (no Normalize, as in the PyTorch quickstart), ``DataLoader(batch_size=64, shuffle=True)``
    with the default ``num_workers=0``, each batch moved to the device, a model that starts with
    ``nn.Flatten``, and an accuracy pass over a second ``DataLoader`` (batch 64) (training set).
(b) project: the whole dataset as one normalised tensor on the device and batches indexed from
    it: ``helpers.train`` (batch 64, and the notebook's BATCH_SIZE 128) followed by
    ``helpers.accuracy`` over the training set. ``helpers.train`` also evaluates the 10,000 test
    images at the end of the epoch; that is timed too (it only counts against the project).

Runs are interleaved (a, b64, b128, a, b64, b128, ...) after one warm-up of each, in one process
with one thread setting; the median seconds per epoch of each and the ratios a / b are printed,
ending with a markdown table for the README. On CUDA the device is synchronised before every
clock read. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_pipeline [--repeats 3] [--threads N]

On a CPU shared with other busy processes, torch's default of one thread per core can make every
small matrix product wait for a descheduled thread (epochs 10x slower and erratic): compare the
per-round times, and try ``--threads 1``.

``DORA_DEVICE=cpu`` forces the CPU (see ``helpers.pick_device``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import helpers
from dora_tutorial.notebook import import_notebook_definitions

REPO = Path(__file__).resolve().parents[1]


SIZES = import_notebook_definitions().SIZES
LR = 1e-3
TUTORIAL_BATCH = 64
PROJECT_BATCHES = (64, 128)  # 128 is the notebook's BATCH_SIZE
DATA = REPO / "data"
TUTORIAL = "(a) tutorial: DataLoader + ToTensor"
PROJECT = "(b) project: one tensor on the device"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for both (default: torch's)",
    )
    return parser.parse_args()


# --------------------------------------------------------------------------------------
# (a) The tutorial pipeline
# --------------------------------------------------------------------------------------


def tutorial_data() -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader and an in-order loader for the accuracy pass, as tutorials do."""
    train_data = datasets.MNIST(
        root=DATA, train=True, download=True, transform=transforms.ToTensor()
    )
    train_loader = DataLoader(train_data, batch_size=TUTORIAL_BATCH, shuffle=True)
    eval_loader = DataLoader(train_data, batch_size=TUTORIAL_BATCH)
    return train_loader, eval_loader


def tutorial_train(model: nn.Module, loader: DataLoader, device: torch.device) -> None:
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def tutorial_accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(loader.dataset)


def tutorial_epoch(loaders: tuple[DataLoader, DataLoader], device: torch.device):
    """Returns a function timing one tutorial epoch: (seconds, training-set accuracy)."""

    def run() -> tuple[float, float]:
        model = nn.Sequential(nn.Flatten(), *helpers.make_mlp(SIZES, seed=0)).to(device)
        train_loader, eval_loader = loaders

        def epoch() -> float:
            tutorial_train(model, train_loader, device)
            return tutorial_accuracy(model, eval_loader, device)

        return helpers.timed(epoch, device)

    return run


# --------------------------------------------------------------------------------------
# (b) The project pipeline
# --------------------------------------------------------------------------------------


def project_task(device: torch.device) -> helpers.Task:
    return helpers.make_task(*helpers.load_mnist(DATA, verbose=False), device=device)


def project_epoch(task: helpers.Task, batch_size: int, device: torch.device):
    """Returns a function timing one project epoch: (seconds, training-set accuracy)."""

    def run() -> tuple[float, float]:
        model = helpers.make_mlp(SIZES, seed=0).to(device)

        def epoch() -> float:
            helpers.train(model, task, epochs=1, lr=LR, batch_size=batch_size, log=None)
            return helpers.accuracy(model, task.train_x, task.train_y)

        return helpers.timed(epoch, device)

    return run


# --------------------------------------------------------------------------------------
# Measuring and reporting
# --------------------------------------------------------------------------------------


def interleave(cases: dict, repeats: int) -> dict[tuple[str, int], list[float]]:
    """One warm-up of each case, then `repeats` rounds of all cases in turn; seconds per case."""
    for run in cases.values():
        run()
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in cases}
    for r in range(1, repeats + 1):
        for (name, batch), run in cases.items():
            s, acc = run()
            seconds[name, batch].append(s)
            print(f"  round {r}: {name}, batch {batch:<4} {s:6.2f} s  (train accuracy {acc:.2%})")
    return seconds


def markdown_table(medians: dict[tuple[str, int], float], baseline: float) -> str:
    lines = [
        "| pipeline | batch size | s/epoch (train + accuracy pass) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for (name, batch), s in medians.items():
        lines.append(f"| {name} | {batch} | {s:.2f} | {baseline / s:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = helpers.pick_device()
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    setup_a, loaders = helpers.timed(tutorial_data, device)
    setup_b, task = helpers.timed(lambda: project_task(device), device)
    print(f"one-time setup (not timed below): tutorial {setup_a:.2f} s, project {setup_b:.2f} s")
    cases = {(TUTORIAL, TUTORIAL_BATCH): tutorial_epoch(loaders, device)}
    for batch in PROJECT_BATCHES:
        cases[PROJECT, batch] = project_epoch(task, batch, device)
    seconds = interleave(cases, args.repeats)
    medians = {key: statistics.median(s) for key, s in seconds.items()}
    baseline = medians[TUTORIAL, TUTORIAL_BATCH]
    print(f"\nmedian of {args.repeats} epochs (after one warm-up each):")
    for (name, batch), s in medians.items():
        spread = f"{min(seconds[name, batch]):.2f}-{max(seconds[name, batch]):.2f} s"
        print(f"  {name}, batch {batch}: {s:.2f} s/epoch ({spread}), a/b = {baseline / s:.1f}x")
    print(f"\n{markdown_table(medians, baseline)}")


if __name__ == "__main__":
    main()
