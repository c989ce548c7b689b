"""DoRA beyond nn.Linear: a small CNN fine-tuned three ways on the notebook's rotated digits.

    .venv/bin/python -m experiments.cnn

The notebook's protocol, read from DoRA.ipynb (``dora_tutorial/notebook.py``: rotated task and
validation split, seeds, epochs, batch size, rank, alpha, pretraining), on a small CNN instead of
the MLP: two 3x3 convolutions with stride 2, then two linear layers. LoRA and DoRA adapt all
four, with the notebook's classes (``Conv2dWithLoRA`` / ``Conv2dWithDoRA`` next to the linear
ones, through ``helpers.add_adapters`` with a dict). The CNN is pretrained on MNIST as the
notebook pretrains its MLP; each method's learning rate is chosen on the validation split exactly
as the MLP's are chosen (the test set plays no part); then each method
trains at its rate, every seed at once, and the methods are compared on the test set with
the notebook's paired tests (DoRA vs LoRA, full FT vs DoRA). Writes experiments/cnn.json: the
protocol it ran, the CNN, the validation table and chosen rates, the results table, the
comparisons and their sentences, which the notebook prints.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

import helpers
from dora_tutorial.atomic_write import write_json
from dora_tutorial.notebook import import_notebook_definitions, protocol
from experiments.common import choose_rates, fine_tune, pretrain, tasks

REPO = Path(__file__).resolve().parents[1]


CHANNELS = (8, 16)  # of the two convolutions (28 -> 14 -> 7 pixels)
HIDDEN = 64  # units of the hidden linear layer
RESULTS = Path(__file__).with_name("cnn.json")


def make_cnn(seed: int = 0) -> nn.Sequential:
    """Conv 3x3 stride 2 - ReLU - conv 3x3 stride 2 - ReLU - linear - ReLU - linear, seeded.

    Its inputs are the rows of 784 pixels ``helpers.make_task`` gives (unflattened first)."""
    torch.manual_seed(seed)
    c1, c2 = CHANNELS
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, c1, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def describe(model: nn.Sequential) -> str:
    """The layers in one line, e.g. 'Conv2d(1, 8, 3x3, stride 2) - ReLU - ... - Linear(64, 10)'."""
    parts = []
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            kernel = "x".join(map(str, layer.kernel_size))
            parts.append(
                f"Conv2d({layer.in_channels}, {layer.out_channels}, {kernel}, "
                f"stride {layer.stride[0]})"
            )
        elif isinstance(layer, nn.Linear):
            parts.append(f"Linear({layer.in_features}, {layer.out_features})")
        elif not isinstance(layer, nn.Unflatten | nn.Flatten):
            parts.append(type(layer).__name__)
    return " - ".join(parts)


def main() -> None:
    start = time.perf_counter()
    nb = import_notebook_definitions()
    p = protocol(nb)  # the notebook's settings, saved with the result
    device = helpers.pick_device()
    mnist, rotated = tasks(p, device)
    pretrained = make_cnn(seed=0)
    pretraining = pretrain(pretrained, mnist, p)
    on_rotated = 100 * helpers.accuracy(pretrained, rotated.test_x, rotated.test_y)
    methods = {
        "full FT": None,
        "LoRA": {nn.Linear: nb.LinearWithLoRA, nn.Conv2d: nb.Conv2dWithLoRA},
        "DoRA": {nn.Linear: nb.LinearWithDoRA, nn.Conv2d: nb.Conv2dWithDoRA},
    }
    sweep = choose_rates(pretrained, rotated, methods, p)
    runs = {}
    for name, wrapper in methods.items():
        runs[name] = fine_tune(pretrained, rotated, wrapper, sweep["chosen"][name], p, "test")
        assert runs[name].final.min() > on_rotated, f"{name} did not learn"
        print(f"{name}: test accuracy {runs[name].final.mean():.2f} %", flush=True)
    comparisons = [
        helpers.compare("DoRA", runs["DoRA"], "LoRA", runs["LoRA"]),
        helpers.compare("full FT", runs["full FT"], "DoRA", runs["DoRA"]),
    ]
    seconds, threads = time.perf_counter() - start, torch.get_num_threads()
    cnn = (
        f"The CNN: {describe(pretrained)}; pretrained on MNIST to {pretraining.final[0]:.2f} % "
        f"(test set), {on_rotated:.2f} % on the rotated test digits. LoRA and DoRA adapt its two "
        f"convolutions and two linear layers at rank {p['RANK']}, alpha {p['ALPHA']}. "
        f"experiments/cnn.py ran for {seconds / 60:.0f} minutes ({device.type}, {threads} "
        f"thread{'s' if threads > 1 else ''})."
    )
    result = {
        "protocol": p,
        "cnn": cnn,
        "pretrained": {"mnist": float(pretraining.final[0]), "rotated": on_rotated},
        "rates": sweep["rates"],
        "validation": sweep["validation"],
        "chosen": sweep["chosen"],
        "validation_table": sweep["table"],
        "table": helpers.results_table(runs),
        "final": {name: [float(a) for a in r.final] for name, r in runs.items()},
        "comparisons": [dataclasses.asdict(c) for c in comparisons],
        "sentences": [c.sentence() for c in comparisons],
        "seconds": seconds,
    }
    write_json(RESULTS, result)
    print(result["table"])
    print(*result["sentences"], sep="\n")
    print(f"saved {RESULTS.relative_to(REPO)} ({seconds / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
