"""What the benchmarks share: the notebook and device, one interleaved timer, the README table."""

from __future__ import annotations

import random
import statistics

import torch

import helpers
from dora_tutorial.notebook import import_notebook_definitions


def setup(threads: int | None = None):
    """(the notebook's definitions, the device), after printing what the numbers ran on."""
    if threads:
        torch.set_num_threads(threads)
    device = helpers.pick_device()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    return import_notebook_definitions(), device


def interleaved(cases: dict, repeats: int, warmup: int = 1, shuffle: bool = False) -> dict:
    """{name: median seconds}: each case is a function returning the seconds it measured.

    Cases run in rounds (each once per round, in a new seeded order if ``shuffle``) after
    ``warmup`` rounds, so a slow spell of a shared machine hits every case alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order, rng = list(cases), random.Random(0)
    for i in range(warmup + repeats):
        if shuffle:
            rng.shuffle(order)
        for name in order:
            seconds = cases[name]()
            if i >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(s) for name, s in samples.items()}


def readme_table(title: str, columns: list[str], rows: list[list]) -> None:
    """Rows (configuration, variant, then ``columns``) as a markdown table for the README."""
    print(f"\nREADME table ({title}, torch {torch.__version__}):\n")
    print("| configuration | variant | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows))
