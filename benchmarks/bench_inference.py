"""Unmerged inference: does DoRA cost what LoRA costs once its per-call work is kept?

In eval mode with autograd off, the notebook's practical DoRA layer (Part III's ``DoRALinear``)
keeps what depends on the parameters only (``InferenceCache``): k = m / ||V||, one number per
output. Part I's textbook ``LinearWithDoRA`` keeps nothing: it rebuilds W' on every call.
Timed here, one forward call under ``torch.no_grad()`` each:

* LoRA: the notebook's ``LinearWithLoRA``, unmerged;
* DoRA textbook: Part I's layer, which builds W' on every call; DoRA efficient, "recomputed":
  ``DoRALinear`` in training mode (no dropout, so the same function), which recomputes k on
  every call; "k kept": eval mode, the cache in use;
* PEFT DoRA: ``get_peft_model(..., LoraConfig(use_dora=True))`` in eval mode, without and with
  PEFT's own opt-in cache (``peft.helpers.DoraCaching``: it keeps B A and ||V|| in eval mode and
  clears them only when the layer goes back to training, so a parameter changed in eval mode
  is not noticed);
* merged: every adapter folded into a plain ``nn.Linear`` (the notebook's ``merge``).

Configurations: the notebook's MLP (its SIZES, RANK, ALPHA) and one 4096 x 4096 layer (rank 16),
each at 1 token (one input row: generation, a single request) and 1,024 tokens. float32; the
CPU, or CUDA when available. After warm-up calls, each round times every variant once, in a
new random order (seeded), each sample lasting about 20 ms; the median of the rounds is
reported. The clock is wall-clock time (after a device sync on a GPU), so run it on a quiet
machine. Not CPU time: that counts the spin-waiting of PyTorch's idle worker threads, which
depends on what ran just before, and gave 0.72x to 2.10x for one ratio on one machine (wall
clock, shuffled: 1.11x and 1.12x). Ratios come from this one run. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_inference [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
from pathlib import Path

import torch
from torch import nn

import helpers
from benchmarks.bench_dora import BOOK, LORA, PEFT, default_norm, print_readme_table, variants
from dora_tutorial.notebook import import_notebook_definitions

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--rank", type=int, default=16, help="rank at 4096 x 4096 (MLP: RANK)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 1024])
    return parser.parse_args()


def inference_variants(nb, base: nn.Module, rank: int, alpha: float) -> dict[str, tuple]:
    """{name: (model, context)}: each model in the mode it is timed in, called inside context."""
    from peft.helpers import DoraCaching

    models = variants(nb, base, rank, alpha)
    first = next(m for m in base.modules() if isinstance(m, nn.Linear))
    efficient = default_norm(nb, first.in_features, first.out_features)  # the layer's default
    plain = contextlib.nullcontext
    return {
        "LoRA": (models[LORA].eval(), plain),
        "DoRA textbook, recomputed": (copy.deepcopy(models[BOOK]).train(), plain),
        "DoRA efficient, recomputed": (copy.deepcopy(models[efficient]).train(), plain),
        "DoRA efficient, k kept": (models[efficient].eval(), plain),
        "PEFT DoRA": (models[PEFT].eval(), plain),
        "PEFT DoRA, DoraCaching": (copy.deepcopy(models[PEFT]).eval(), DoraCaching),
        "merged": (helpers.merge_adapters(models[BOOK], nb.merge).eval(), plain),
    }


def seconds_per_call(model, context, x: torch.Tensor, calls: int) -> float:
    """Wall-clock seconds per call over ``calls`` calls (device synchronised)."""

    def run():
        for _ in range(calls):
            model(x)

    with context():
        return helpers.timed(run, x.device)[0] / calls


@torch.no_grad()
def measure(models: dict[str, tuple], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant over ``repeats`` rounds, each round every
    variant once in a new random order (no variant always follows the same one)."""
    calls = {}
    for name, (model, context) in models.items():  # warm-up (fills every cache), then calibrate
        once = max(seconds_per_call(model, context, x, 2), 1e-7)
        calls[name] = max(1, min(1000, round(0.02 / once)))
    samples: dict[str, list[float]] = {name: [] for name in models}
    order, rng = list(models), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            model, context = models[name]
            samples[name].append(seconds_per_call(model, context, x, calls[name]))
    return {name: statistics.median(samples[name]) for name in models}


@torch.no_grad()
def check_same_function(models: dict[str, tuple], x: torch.Tensor) -> None:
    """Every DoRA variant and the merged model compute the same function, also from kept
    values (a broken cache must not be timed)."""
    ref = models["DoRA textbook, recomputed"][0](x)
    for name, (model, context) in models.items():
        with context():
            for _ in range(2):  # the second call uses what the first one kept
                diff = ((model(x) - ref).abs().max() / ref.abs().max()).item()
                assert name == "LoRA" or diff < 1e-4, f"{name} differs by {diff:.1e}"


def report(title: str, seconds: dict[str, float]) -> list[str]:
    lora, merged = seconds["LoRA"], seconds["merged"]
    print(f"\n{title}")
    print(f"  {'variant':<30}{'ms / call':>11}{'x LoRA':>9}{'x merged':>10}")
    rows = []
    for name, s in seconds.items():
        print(f"  {name:<30}{1000 * s:>11.3f}{s / lora:>9.2f}{s / merged:>10.2f}")
        rows.append(f"| {title} | {name} | {1000 * s:.3f} | {s / lora:.2f} | {s / merged:.2f} |")
    return rows


def main() -> None:
    args = parse_args()
    device = helpers.pick_device()
    nb = import_notebook_definitions()
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{args.repeats} shuffled rounds (median)"
    )
    configurations = [
        (f"MLP {'-'.join(map(str, nb.SIZES))}, r={nb.RANK}", helpers.make_mlp(nb.SIZES), nb.RANK),
        (f"4096x4096, r={args.rank}", nn.Sequential(nn.Linear(4096, 4096)), args.rank),
    ]
    rows, goal = [], []
    for title, base, rank in configurations:
        torch.manual_seed(0)
        models = inference_variants(nb, base.to(device), rank, 2 * rank)
        for tokens in args.tokens:
            x = torch.randn(tokens, next(base.parameters()).shape[1], device=device)
            check_same_function(models, x)
            seconds = measure(models, x, args.repeats)
            rows += report(f"{title}, {tokens} token{'s' * (tokens > 1)}", seconds)
            if tokens == 1:
                ratio = seconds["DoRA efficient, k kept"] / seconds["LoRA"]
                goal.append(f"{title}: {ratio:.2f}")
    print(
        "\nkept-k efficient DoRA / unmerged LoRA at 1 token (goal: at most 1.1): " + "; ".join(goal)
    )
    print_readme_table(device, ["ms / call", "x LoRA", "x merged"], rows)


if __name__ == "__main__":
    main()
