"""DoRA beyond nn.Linear: a small CNN (design, usage: experiments/README.md)."""

import time

import torch
from torch import nn

from dora_tutorial.atomic_write import write_json
from experiments.common import choose, fine_tune, outcome, pretrain, results_path, start, tasks

CHANNELS = (8, 16)  # of the two convolutions (28 -> 14 -> 7 pixels)
HIDDEN = 64  # units of the hidden linear layer
LAYERS = {  # how the description names a layer; the others are left out
    nn.Conv2d: "Conv2d({in_channels}, {out_channels}, {kernel_size[0]}x{kernel_size[1]}, "
    "stride {stride[0]})",
    nn.Linear: "Linear({in_features}, {out_features})",
    nn.ReLU: "ReLU",
}
RATES = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)  # widened where the best is at an edge


def validation_table(validation: dict, seeds: int) -> str:
    """A row per rate, a column per method (blank at a rate a method's grid lacks)."""
    lines = [
        f"validation accuracy (%), mean ± std over {seeds} seeds",
        f"{'lr':>8}" + "".join(f"{name:>18}" for name in validation),
    ]
    for lr in sorted({float(lr) for rates in validation.values() for lr in rates}):
        cells = (" ± ".join(f"{v:.2f}" for v in s.get(f"{lr:g}", [])) for s in validation.values())
        lines.append(f"{lr:>8g}" + "".join(f"{cell:>18}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    nb, p, device = start()
    mnist, rotated = tasks(p, device)
    torch.manual_seed(0)
    c1, c2 = CHANNELS
    pretrained = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),  # from rows of 784 pixels, as helpers.make_task gives them
        nn.Conv2d(1, c1, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )
    before = pretrain(pretrained, mnist, rotated, p, p["PRETRAIN_EPOCHS"])
    methods = {
        "full FT": None,
        "LoRA": {nn.Linear: nb.LinearWithLoRA, nn.Conv2d: nb.Conv2dWithLoRA},
        "DoRA": {nn.Linear: nb.LinearWithDoRA, nn.Conv2d: nb.Conv2dWithDoRA},
    }
    validation, best = choose(pretrained, rotated, p, methods, dict.fromkeys(methods, RATES))
    chosen = {name: float(lr) for name, (lr, _) in best.items()}
    runs = {
        name: fine_tune(pretrained, rotated, p, wrapper, chosen[name], evaluate_on="test")
        for name, wrapper in methods.items()
    }
    assert all(r.final.min() > before["rotated"] for r in runs.values()), "a method did not learn"
    seconds, threads = time.perf_counter() - started, torch.get_num_threads()
    layers = " - ".join(LAYERS[type(m)].format(**vars(m)) for m in pretrained if type(m) in LAYERS)
    cnn = (
        f"The CNN: {layers}; pretrained on MNIST to {before['mnist']:.2f} % "
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
