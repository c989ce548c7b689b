"""What the benchmarks share: the notebook and device, an interleaved timer, ratio tables."""

import contextlib
import random
import statistics

import torch

import helpers
from dora_tutorial.notebook import import_notebook_definitions


def setup():
    """(the notebook's definitions, the device), after printing what the numbers ran on."""
    device = helpers.pick_device()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    return import_notebook_definitions(), device


def interleaved(cases: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: median seconds} of cases that return the seconds they measured, run in rounds in
    seeded random orders, so a slow spell of a shared machine hits every case alike."""
    samples: dict = {name: [] for name in cases}
    order, rng = list(cases), random.Random(0)
    for _ in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            samples[name].append(cases[name]())
    return {name: statistics.median(s[warmup:]) for name, s in samples.items()}


def per_call(fn, device, context=contextlib.nullcontext):
    """A case for ``interleaved``: seconds per call of ``fn`` in ``context``, over samples of
    about 20 ms (a single short call is mostly clock noise); calibrating warms it up."""

    def sample(calls: int) -> float:
        with context():
            return helpers.timed(lambda: [fn() for _ in range(calls)], device)[0] / calls

    calls = max(1, min(1000, round(0.02 / max(sample(2), 1e-7))))
    return lambda: sample(calls)


def ratio_rows(label: str, seconds: dict, *baselines: str) -> list[list]:
    """[label, case, ms, its time as a multiple of each baseline's] per case."""
    return [
        [label, name, f"{1000 * s:.3f}", *(f"{s / seconds[b]:.2f}" for b in baselines)]
        for name, s in seconds.items()
    ]


def table(header: list[str], rows: list[list]) -> None:
    """A markdown table, as the README shows it."""
    print("\n| " + " | ".join(header) + " |\n|---" + "|---:" * (len(header) - 1) + "|")
    print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows))
