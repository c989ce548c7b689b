"""Figure 2 where the paper measured it, on a small ViT (design, usage: experiments/README.md)."""

import dataclasses
import json
import math
import sys
import time

import numpy as np
import torch
from torch import nn

import helpers
from dora_tutorial.atomic_write import write_json
from experiments.common import choose, outcome, pretrain, results_path, start, tasks

PATCH = 7  # pixels per side of a patch: 16 tokens of 49 values
WIDTH = 64
HEADS = 4
MLP_WIDTH = 256
BLOCKS = 6
POOLING = "mean"  # of the tokens, before the head (no class token)
PRETRAIN_EPOCHS = 3  # as the notebook's MLP
N_SEEDS = 5
RATES = {"full FT": [3e-4, 1e-3, 2e-3, 5e-3], "LoRA": [2e-3, 5e-3, 1e-2, 2e-2]}
RATES["DoRA"] = RATES["LoRA"]
ADAPTED = ["q", "v"]  # the attention projections LoRA and DoRA adapt
THREADS = 1
# this script's settings (every name above in capitals), as vit.json records them
SETTINGS = {name: value for name, value in globals().items() if name.isupper()}
# the notebook's settings it reads, as vit.json records them
USED = "ANGLE FT_TRAIN_SIZE VAL_SIZE FT_EPOCHS BATCH_SIZE RANK ALPHA PRETRAIN_LR SEEDS".split()
USED.append("PAPER_CORRELATION")
# the query and value matrices, block by block: 'blocks.0.attn.q', 'blocks.0.attn.v', ...
FIGURE2_LAYERS = [f"blocks.{b}.attn.{name}" for b in range(BLOCKS) for name in ADAPTED]


class QueryValue(nn.Linear):
    """A query or value projection: an ``nn.Linear`` that ``add_adapters`` can single out."""


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)); the attention
    has separate q, k, v and output projections."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        projections = {  # in this order: the seeded initial weights
            name: (QueryValue if name in ADAPTED else nn.Linear)(WIDTH, WIDTH)
            for name in ("q", "k", "v", "out")
        }
        self.attn, self.norm2 = nn.ModuleDict(projections), nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, MLP_WIDTH), nn.GELU(), nn.Linear(MLP_WIDTH, WIDTH)
        )

    def forward(self, x):
        (n, t, d), normed = x.shape, self.norm1(x)
        q, k, v = (self.attn[f](normed).view(n, t, HEADS, -1).transpose(1, 2) for f in "qkv")
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // HEADS)).softmax(-1)
        x = x + self.attn.out((weights @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Rows of 784 pixels -> 16 patches of 7 x 7 -> linear embedding + learned positions ->
    ``BLOCKS`` blocks -> layer norm -> mean over tokens -> linear head (10 classes)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, WIDTH)
        self.position = nn.Parameter(0.02 * torch.randn((28 // PATCH) ** 2, WIDTH))
        self.blocks = nn.Sequential(*[Block() for _ in range(BLOCKS)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        n, g = len(x), 28 // PATCH
        patches = x.reshape(n, g, PATCH, g, PATCH).transpose(2, 3).reshape(n, g * g, -1)
        h = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(h).mean(1))


def validation_table(validation: dict, seeds: int) -> str:
    lines = [f"validation accuracy (%), mean ± std over {seeds} seeds"]
    for name, rates in validation.items():
        cells = ", ".join(f"lr {lr}: {m:.2f} ± {s:.2f}" for lr, (m, s) in rates.items())
        lines.append(helpers.wrap(f"{name:<8} {cells}", indent=" " * 9))
    return "\n".join(lines)


def main() -> None:
    started, cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(THREADS)
    nb, p, device = start()
    mnist, rotated = tasks(p, device)
    torch.manual_seed(0)
    pretrained = ViT()
    before = pretrain(pretrained, mnist, rotated, p, PRETRAIN_EPOCHS)
    adapters = {"LoRA": nb.LinearWithLoRA, "DoRA": nb.LinearWithDoRA}
    methods = {"full FT": None} | {name: {QueryValue: w} for name, w in adapters.items()}
    seeds = p["SEEDS"][:N_SEEDS]
    validation, best = choose(
        pretrained, rotated, p, methods, RATES, seeds=seeds, record_weights=True
    )
    runs, points = {}, {}
    for name, (_, r) in best.items():  # each seed's final model on the test set, once
        acc = [[helpers.accuracy(m, rotated.test_x, rotated.test_y)] for m in r.models]
        runs[name] = dataclasses.replace(r, test_acc=np.array(acc))
        points[name] = helpers.figure2_points(r, pretrained, FIGURE2_LAYERS)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    trainable = {name: r.trainable for name, r in runs.items()}
    vit = (
        f"The ViT: 7 x 7 patches (16 tokens), width {WIDTH}, {HEADS} heads, MLP {MLP_WIDTH}, "
        f"{BLOCKS} pre-norm blocks, {POOLING} pooling; {helpers.parameter_counts(pretrained)[1]:,} "
        f"parameters; pretrained on MNIST for {PRETRAIN_EPOCHS} epochs to "
        f"{before['mnist']:.2f} % (test set), {before['rotated']:.2f} % on the rotated test "
        f"digits. LoRA and DoRA adapt the query and value projections of each block at rank "
        f"{p['RANK']}, alpha {p['ALPHA']} ({trainable['LoRA']:,} and {trainable['DoRA']:,} "
        f"trainable parameters). experiments/vit.py ran for {seconds / 60:.0f} minutes of wall "
        f"time, {cpu_seconds / 60:.0f} minutes of CPU time ({device.type}, {THREADS} thread, on a "
        f"CPU shared with other work)."
    )
    result = {
        "protocol": {key: p[key] for key in USED},
        "settings": SETTINGS,
        "vit": vit,
        "pretrained": before,
        "trainable": trainable,
        "rates": {name: [float(lr) for lr in v] for name, v in validation.items()},
        "validation": validation,
        "chosen": {name: float(lr) for name, (lr, _) in best.items()},
        **outcome(runs),
        "points": points,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }
    write_json(results_path("vit"), result)  # the training's results: --analyse redoes the rest
    reanalyse()


def reanalyse() -> None:
    """Recompute vit.json's analysis from its recorded points (no training)."""
    path = results_path("vit")
    result = json.loads(path.read_text())
    analysis = helpers.figure2_analysis(result["points"], result["protocol"]["PAPER_CORRELATION"])
    result["figure2"] = {**analysis, "table": helpers.figure2_table(analysis)}
    seeds = len(result["final"]["LoRA"])
    result["validation_table"] = validation_table(result["validation"], seeds)
    write_json(path, result)
    print(result["table"], result["figure2"]["table"], *result["sentences"], sep="\n")
    print(*result["figure2"]["conclusions"].values(), sep="\n")


if __name__ == "__main__":
    reanalyse() if "--analyse" in sys.argv else main()
