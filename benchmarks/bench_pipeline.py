"""How much faster is one epoch with the project's data pipeline than with the tutorial one?

    .venv/bin/python -m benchmarks.bench_pipeline [--repeats 3] [--threads N]

Both train the notebook's MLP (its SIZES, seed 0, Adam lr 1e-3) for one epoch on MNIST's 60,000
training images, then make one accuracy pass over them; building the dataset is not timed.
(a) tutorial: ``datasets.MNIST(transform=ToTensor())`` and ``DataLoader(batch_size=64,
shuffle=True)`` as popular tutorials write them, each batch moved to the device, and a second
loader for the accuracy pass; (b) project: the dataset as one tensor on the device, batches
indexed from it (``helpers.train`` at batch 64 and at the notebook's 128, which also evaluates
the test set: that only counts against the project, then ``helpers.accuracy``).
On a CPU shared with busy processes try ``--threads 1``: one thread per core can make every
small product wait for a descheduled thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import helpers
from benchmarks.common import interleaved, setup

DATA = Path(__file__).resolve().parents[1] / "data"
TUTORIAL = "(a) tutorial: DataLoader + ToTensor"
PROJECT = "(b) project: one tensor on the device"


def tutorial_epoch(sizes, device):
    data = datasets.MNIST(root=DATA, train=True, download=True, transform=transforms.ToTensor())
    train, evaluate = DataLoader(data, batch_size=64, shuffle=True), DataLoader(data, batch_size=64)

    def epoch():
        model = nn.Sequential(nn.Flatten(), *helpers.make_mlp(sizes, seed=0)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for x, y in train:
            x, y = x.to(device), y.to(device)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            correct = sum(
                (model(x.to(device)).argmax(1) == y.to(device)).sum().item() for x, y in evaluate
            )
        print(f"  {TUTORIAL}: train accuracy {correct / len(data):.2%}")

    return lambda: helpers.timed(epoch, device)[0]


def project_epoch(sizes, task, batch_size, device):
    def epoch():
        model = helpers.make_mlp(sizes, seed=0).to(device)
        helpers.train(model, task, epochs=1, lr=1e-3, batch_size=batch_size, log=None)
        accuracy = helpers.accuracy(model, task.train_x, task.train_y)
        print(f"  {PROJECT}, batch {batch_size}: train accuracy {accuracy:.2%}")

    return lambda: helpers.timed(epoch, device)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both")
    args = parser.parse_args()
    nb, device = setup(args.threads)
    task = helpers.make_task(*helpers.load_mnist(DATA, verbose=False), device=device)
    cases = {(TUTORIAL, 64): tutorial_epoch(nb.SIZES, device)}
    cases |= {(PROJECT, b): project_epoch(nb.SIZES, task, b, device) for b in (64, 128)}
    medians = interleaved(cases, args.repeats)
    baseline = medians[TUTORIAL, 64]
    print(f"\nmedian of {args.repeats} epochs (after one warm-up each):\n")
    print("| pipeline | batch size | s/epoch (train + accuracy pass) | speed-up |")
    print("|---|---:|---:|---:|")
    for (name, batch), s in medians.items():
        print(f"| {name} | {batch} | {s:.2f} | {baseline / s:.1f}x |")


if __name__ == "__main__":
    main()
