"""Figure 2 where the paper measured it: a small ViT's query and value matrices, three ways.

    .venv/bin/python -m experiments.vit              # the experiment (it records its time)
    .venv/bin/python -m experiments.vit --analyse    # recompute the analysis from vit.json
    .venv/bin/python -m experiments.vit --smoke      # a tiny run, to /tmp: does it all work?

The DoRA paper (section 3.2, Figure 2) measured magnitude and direction changes on the query and
value matrices of a transformer across 6 layers, at 3 intermediate checkpoints and the final one.
Here: a ViT over 7 x 7 MNIST patches (16 tokens of 49 values, width 64, 4 heads, MLP 256, 6
pre-norm blocks, mean pooling), pretrained on MNIST, then fine-tuned on the notebook's rotated
digits (its angle, training and validation sizes, epochs, batch size, rank and alpha, read from
DoRA.ipynb by ``dora_tutorial/notebook.py``) with full fine-tuning, LoRA and DoRA. LoRA and
DoRA adapt the query and value projections only, with the notebook's classes (``add_adapters``
with a dict keyed by ``QueryValue``, the ``nn.Linear`` subclass the attention uses for q and v).
The weights are recorded after each epoch (the notebook's 4 epochs: 3 intermediate checkpoints
and the final one), every seed trained at once.

Each method's rate is chosen on the validation split from a grid of four (``RATES``), widened
while the best rate sits at an edge (``experiments/common.tune``); the test set
is evaluated once, after the choice, on the chosen runs' final models. The analysis is
``helpers.figure2_analysis`` on the 12 query/value matrices; the accuracy comparison is
the notebook's paired tests. Writes experiments/vit.json: the protocol keys it used, its own
settings, the rates, accuracies per seed, every Figure 2 point, the analysis and its verdicts.

To fit a 2-core CPU shared with other work, it uses the notebook's first ``N_SEEDS`` seeds and
runs on one thread (two threads ran slower per step on the shared CPU, measured).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import helpers
from dora_tutorial.atomic_write import write_json
from dora_tutorial.notebook import import_notebook_definitions, protocol
from experiments.common import tasks, tune

REPO = Path(__file__).resolve().parents[1]

PATCH = 7  # pixels per side of a patch: 16 tokens of 49 values
WIDTH = 64
HEADS = 4
MLP_WIDTH = 256
BLOCKS = 6
POOLING = "mean"  # of the tokens, before the head (no class token)
PRETRAIN_EPOCHS = 3  # as the notebook's MLP
N_SEEDS = 5  # the notebook's first seeds
# each grid widens past an edge where its best rate sits (experiments/common.tune)
RATES = {
    "full FT": (3e-4, 1e-3, 2e-3, 5e-3),
    "LoRA": (2e-3, 5e-3, 1e-2, 2e-2),
    "DoRA": (2e-3, 5e-3, 1e-2, 2e-2),
}
ADAPTED = ("q", "v")  # the attention projections LoRA and DoRA adapt
THREADS = 1
USED = (  # the notebook's settings this script reads; vit.json records exactly these
    "ANGLE",
    "FT_TRAIN_SIZE",
    "VAL_SIZE",
    "FT_EPOCHS",
    "BATCH_SIZE",
    "RANK",
    "ALPHA",
    "PRETRAIN_LR",
    "SEEDS",
    "PAPER_CORRELATION",
)
RESULTS = Path(__file__).with_name("vit.json")


def settings() -> dict:
    """This script's own settings, as vit.json records them."""
    return {
        "PATCH": PATCH,
        "WIDTH": WIDTH,
        "HEADS": HEADS,
        "MLP_WIDTH": MLP_WIDTH,
        "BLOCKS": BLOCKS,
        "POOLING": POOLING,
        "PRETRAIN_EPOCHS": PRETRAIN_EPOCHS,
        "N_SEEDS": N_SEEDS,
        "RATES": {name: list(rates) for name, rates in RATES.items()},
        "ADAPTED": list(ADAPTED),
        "THREADS": THREADS,
    }


class QueryValue(nn.Linear):
    """A query or value projection: an ``nn.Linear`` that ``add_adapters`` can single out."""


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (
            QueryValue(width, width),
            nn.Linear(width, width),
            QueryValue(width, width),
        )
        self.out = nn.Linear(width, width)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (
            f(x).view(n, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, width)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Rows of 784 pixels -> 16 patches of 7 x 7 -> linear embedding + learned positions ->
    ``BLOCKS`` blocks -> layer norm -> mean over tokens -> linear head (10 classes)."""

    def __init__(self):
        super().__init__()
        self.tokens = (28 // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, WIDTH)
        self.position = nn.Parameter(0.02 * torch.randn(self.tokens, WIDTH))
        self.blocks = nn.Sequential(*[Block(WIDTH, HEADS, MLP_WIDTH) for _ in range(BLOCKS)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x):
        n, g = len(x), 28 // PATCH
        patches = x.reshape(n, g, PATCH, g, PATCH).transpose(2, 3).reshape(n, self.tokens, -1)
        h = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(h).mean(1))


def make_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT()


def figure2_layers() -> list[str]:
    """The query and value matrices, block by block: 'blocks.0.attn.q', 'blocks.0.attn.v', ..."""
    return [f"blocks.{b}.attn.{name}" for b in range(BLOCKS) for name in ADAPTED]


def choose_and_run(pretrained, rotated, methods: dict, p: dict, seeds) -> tuple[dict, dict]:
    """Each method at each of its rates (weights recorded), scored on the validation set; the
    best mean wins and its runs are kept. Returns (validation {method: {rate: [mean, std]}},
    {method: (chosen rate, its Runs)})."""
    validation: dict[str, dict[str, list[float]]] = {}
    best: dict[str, tuple[float, helpers.Runs]] = {}
    for name, wrapper in methods.items():
        validation[name] = {}

        def score(lr, name=name, wrapper=wrapper):
            runs = helpers.finetune(
                pretrained,
                rotated,
                seeds=seeds,
                wrapper=wrapper,
                rank=p["RANK"],
                alpha=p["ALPHA"],
                lr=lr,
                epochs=p["FT_EPOCHS"],
                batch_size=p["BATCH_SIZE"],
                evaluate_on="val",
                record_weights=True,
                log=None,
            )
            acc = runs.final
            validation[name][f"{lr:g}"] = [float(acc.mean()), float(acc.std(ddof=1))]
            print(
                f"{name} lr {lr:g}: validation {acc.mean():.2f} ± {acc.std(ddof=1):.2f} %",
                flush=True,
            )
            if name not in best or acc.mean() > best[name][1].final.mean():
                best[name] = (lr, runs)  # the best so far; the others are let go
            return float(acc.mean())

        tune(score, RATES[name])
        validation[name] = dict(sorted(validation[name].items(), key=lambda kv: float(kv[0])))
    return validation, best


def validation_table(validation: dict, seeds: int) -> str:
    lines = [f"validation accuracy (%), mean ± std over {seeds} seeds"]
    for name, rates in validation.items():
        cells = ", ".join(f"lr {lr}: {m:.2f} ± {s:.2f}" for lr, (m, s) in rates.items())
        lines.append(helpers.wrap(f"{name:<8} {cells}", indent=" " * 9))
    return "\n".join(lines)


def on_test(runs: helpers.Runs, task: helpers.Task) -> helpers.Runs:
    """The same runs with each seed's final model evaluated on the test set (once)."""
    acc = np.array([[helpers.accuracy(m, task.test_x, task.test_y)] for m in runs.models])
    return dataclasses.replace(runs, test_acc=acc)


def analyse(points: dict[str, list[dict]], paper: dict[str, float]) -> dict:
    """The analysis vit.json records, from its points alone."""
    analysis = helpers.figure2_analysis(points, paper)
    analysis["table"] = helpers.figure2_table(analysis)
    return analysis


def main(smoke: bool = False) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(THREADS)
    nb = import_notebook_definitions()
    p = protocol(nb)
    used = {key: p[key] for key in USED}
    run = dict(used)
    if smoke:  # tiny sizes: checks that everything runs, says nothing
        run.update(FT_TRAIN_SIZE=512, VAL_SIZE=256)
    device = helpers.pick_device()
    mnist, rotated = tasks(run, device)
    if smoke:
        mnist = dataclasses.replace(
            mnist, train_x=mnist.train_x[:1024], train_y=mnist.train_y[:1024]
        )
    pretrained = make_vit(seed=0)
    pretraining = helpers.train(
        pretrained,
        mnist,
        epochs=PRETRAIN_EPOCHS,
        lr=run["PRETRAIN_LR"],
        batch_size=run["BATCH_SIZE"],
        log=print,
    )
    pretrained.requires_grad_(False)
    on_rotated = 100 * helpers.accuracy(pretrained, rotated.test_x, rotated.test_y)
    print(f"pretrained: MNIST {pretraining.final[0]:.2f} %, rotated {on_rotated:.2f} %", flush=True)
    methods = {
        "full FT": None,
        "LoRA": {QueryValue: nb.LinearWithLoRA},
        "DoRA": {QueryValue: nb.LinearWithDoRA},
    }
    seeds = run["SEEDS"][: 2 if smoke else N_SEEDS]
    validation, chosen_runs = choose_and_run(pretrained, rotated, methods, run, seeds)
    chosen = {name: float(lr) for name, (lr, _) in chosen_runs.items()}
    runs = {name: on_test(r, rotated) for name, (_, r) in chosen_runs.items()}
    for name, r in runs.items():
        print(f"{name} (lr {chosen[name]:g}): test accuracy {r.final.mean():.2f} %", flush=True)
    points = {
        name: helpers.figure2_points(r, pretrained, figure2_layers()) for name, r in runs.items()
    }
    comparisons = [
        helpers.compare("DoRA", runs["DoRA"], "LoRA", runs["LoRA"]),
        helpers.compare("full FT", runs["full FT"], "DoRA", runs["DoRA"]),
    ]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    trainable = {name: r.trainable for name, r in runs.items()}
    vit = (
        f"The ViT: 7 x 7 patches (16 tokens), width {WIDTH}, {HEADS} heads, MLP {MLP_WIDTH}, "
        f"{BLOCKS} pre-norm blocks, {POOLING} pooling; {helpers.parameter_counts(pretrained)[1]:,} "
        f"parameters; pretrained on MNIST for {PRETRAIN_EPOCHS} epochs to "
        f"{pretraining.final[0]:.2f} % (test set), {on_rotated:.2f} % on the rotated test digits. "
        f"LoRA and DoRA adapt the query and value projections of each block at rank {run['RANK']}, "
        f"alpha {run['ALPHA']} ({trainable['LoRA']:,} and {trainable['DoRA']:,} trainable "
        f"parameters). experiments/vit.py ran for {seconds / 60:.0f} minutes of wall time, "
        f"{cpu_seconds / 60:.0f} minutes of CPU time ({device.type}, {THREADS} thread, on a CPU "
        f"shared with other work)."
    )
    result = {
        "protocol": used,
        "settings": settings(),
        "vit": vit,
        "pretrained": {"mnist": float(pretraining.final[0]), "rotated": on_rotated},
        "trainable": trainable,
        "rates": {name: [float(lr) for lr in v] for name, v in validation.items()},
        "validation": validation,
        "chosen": chosen,
        "validation_table": validation_table(validation, len(seeds)),
        "table": helpers.results_table(runs),
        "final": {name: [float(a) for a in r.final] for name, r in runs.items()},
        "comparisons": [dataclasses.asdict(c) for c in comparisons],
        "sentences": [c.sentence() for c in comparisons],
        "points": points,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }
    path = Path("/tmp/vit_smoke.json") if smoke else RESULTS
    write_json(path, result)  # the training's results first: --analyse can redo the rest
    result["figure2"] = analyse(points, run["PAPER_CORRELATION"])
    write_json(path, result)
    print(result["table"], result["figure2"]["table"], *result["sentences"], sep="\n")
    print(*result["figure2"]["conclusions"].values(), sep="\n")
    print(f"saved {path} ({seconds / 60:.1f} minutes, CPU {cpu_seconds / 60:.1f} minutes)")


def reanalyse(path: Path = RESULTS) -> None:
    """Recompute vit.json's analysis from its recorded points (no training)."""
    import json

    result = json.loads(path.read_text())
    result["figure2"] = analyse(result["points"], result["protocol"]["PAPER_CORRELATION"])
    result["validation_table"] = validation_table(
        result["validation"], len(result["final"]["LoRA"])
    )
    write_json(path, result)
    print(result["figure2"]["table"])


if __name__ == "__main__":
    if "--analyse" in sys.argv:
        reanalyse()
    else:
        main(smoke="--smoke" in sys.argv)
