"""DoRA beyond nn.Linear: a small CNN (design: experiments/README.md).

.venv/bin/python -m experiments.cnn            # writes experiments/cnn.json
.venv/bin/python -m experiments.cnn --smoke    # tiny sizes, to a temporary file
"""

from __future__ import annotations

import time

import torch
from torch import nn

from dora_tutorial.atomic_write import write_json
from experiments.common import fine_tune, outcome, pretrain, results_path, start, tasks, validate

CHANNELS = (8, 16)  # of the two convolutions (28 -> 14 -> 7 pixels)
HIDDEN = 64  # units of the hidden linear layer
LAYERS = {  # how ``describe`` names a layer; the others are left out
    nn.Conv2d: "Conv2d({in_channels}, {out_channels}, {kernel_size[0]}x{kernel_size[1]}, "
    "stride {stride[0]})",
    nn.Linear: "Linear({in_features}, {out_features})",
    nn.ReLU: "ReLU",
}
RATES = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)


def make_cnn(seed: int = 0) -> nn.Sequential:
    """Seeded; its inputs are rows of 784 pixels, as ``helpers.make_task`` gives them."""
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
    return " - ".join(LAYERS[type(m)].format(**vars(m)) for m in model if type(m) in LAYERS)


def validation_table(validation: dict, seeds: int) -> str:
    """A row per rate, a column per method."""
    lines = [
        f"validation accuracy (%), mean ± std over {seeds} seeds",
        f"{'lr':>8}" + "".join(f"{name:>18}" for name in validation),
    ]
    for lr in RATES:
        cells = (f"{s[f'{lr:g}'][0]:.2f} ± {s[f'{lr:g}'][1]:.2f}" for s in validation.values())
        lines.append(f"{lr:>8g}" + "".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    nb, p, device = start()
    mnist, rotated = tasks(p, device)
    pretrained = make_cnn(seed=0)
    before = pretrain(pretrained, mnist, rotated, p, p["PRETRAIN_EPOCHS"])
    methods = {
        "full FT": None,
        "LoRA": {nn.Linear: nb.LinearWithLoRA, nn.Conv2d: nb.Conv2dWithLoRA},
        "DoRA": {nn.Linear: nb.LinearWithDoRA, nn.Conv2d: nb.Conv2dWithDoRA},
    }
    validation = {
        name: {f"{lr:g}": validate(pretrained, rotated, p, name, wrapper, lr)[1] for lr in RATES}
        for name, wrapper in methods.items()
    }
    chosen = {name: float(max(s, key=lambda lr: s[lr][0])) for name, s in validation.items()}
    runs = {
        name: fine_tune(pretrained, rotated, p, wrapper, chosen[name], evaluate_on="test")
        for name, wrapper in methods.items()
    }
    assert all(r.final.min() > before["rotated"] for r in runs.values()), "a method did not learn"
    seconds, threads = time.perf_counter() - started, torch.get_num_threads()
    cnn = (
        f"The CNN: {describe(pretrained)}; pretrained on MNIST to {before['mnist']:.2f} % "
        f"(test set), {before['rotated']:.2f} % on the rotated test digits. LoRA and DoRA adapt "
        f"its two convolutions and two linear layers at rank {p['RANK']}, alpha {p['ALPHA']}. "
        f"experiments/cnn.py ran for {seconds / 60:.0f} minutes ({device.type}, {threads} "
        f"thread{'s' if threads > 1 else ''})."
    )
    result = {
        "protocol": p,
        "cnn": cnn,
        "pretrained": before,
        "rates": list(RATES),
        "validation": validation,
        "chosen": chosen,
        "validation_table": validation_table(validation, len(p["SEEDS"])),
        **outcome(runs),
        "seconds": seconds,
    }
    write_json(results_path("cnn"), result)
    print(result["table"], *result["sentences"], f"saved {results_path('cnn')}", sep="\n")


if __name__ == "__main__":
    main()
