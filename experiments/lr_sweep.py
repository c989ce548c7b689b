"""Where the notebook's learning rates come from: each method's rate, chosen on held-out data.

    .venv/bin/python -m experiments.lr_sweep

Reads the protocol from DoRA.ipynb (network, pretraining, rotated task, seeds, epochs, batch
size, rank, alpha: ``dora_tutorial/notebook.py``), pretrains as the notebook does, then
fine-tunes with full fine-tuning, LoRA and DoRA at each rate in ``RATES``, every seed at once,
and measures accuracy on the validation set: rotated training digits disjoint from the
fine-tuning examples and from the test set. Each method gets the rate with the best mean
validation accuracy; the test set is never looked at. Writes experiments/lr_sweep.json (the
protocol it ran, the table, the chosen rates), which the notebook reads. Accuracy only.

``validation``, ``chosen`` and ``table`` are at the notebook's ``RANK``. ``by_rank`` holds the
same choice for LoRA and DoRA at rank 1 and at the top of the notebook's sweep (``RANKS[-1]``),
with alpha scaled as the rank sweep scales it (alpha / rank = ALPHA / RANK): does the low-rank
comparison change when each method's rate is tuned at that rank? Full fine-tuning has no rank.
"""

from __future__ import annotations

import time
from pathlib import Path

import helpers
from dora_tutorial.files import write_json
from dora_tutorial.notebook import import_notebook_definitions, protocol

REPO = Path(__file__).resolve().parents[1]


RATES = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
RESULTS = Path(__file__).with_name("lr_sweep.json")


def tasks(p: dict, device):
    """(MNIST, the rotated task with its validation split), as the notebook builds them."""
    data = helpers.load_mnist()
    mnist = helpers.make_task(*data, device=device)
    rotated = helpers.make_task(
        *data,
        device=device,
        degrees=p["ANGLE"],
        n_train=p["FT_TRAIN_SIZE"],
        n_val=p["VAL_SIZE"],
        seed=0,
    )
    return mnist, rotated


def pretrain(model, mnist, p: dict) -> helpers.Runs:
    """Pretrain ``model`` on MNIST in place with ``helpers.train``, one model: the algorithm of
    the notebook's plain loop (``train_one_model``: same batches, same Adam), which the MLP
    uses; experiments/cnn.py pretrains its CNN with this."""
    return helpers.train(
        model,
        mnist,
        epochs=p["PRETRAIN_EPOCHS"],
        lr=p["PRETRAIN_LR"],
        batch_size=p["BATCH_SIZE"],
        log=None,
    )


def alpha_at(rank: int, p: dict) -> float:
    """The notebook's alpha at another rank: its rank sweep keeps alpha / rank = ALPHA / RANK."""
    return p["ALPHA"] * rank / p["RANK"]


def fine_tune(
    pretrained, task, wrapper, lr: float, p: dict, evaluate_on: str = "val", rank: int | None = None
):
    """The notebook's fine-tuning protocol for one method at one rate, every seed at once (at
    the notebook's RANK and ALPHA, or at ``rank`` with ``alpha_at(rank)``)."""
    return helpers.finetune(
        pretrained,
        task,
        seeds=p["SEEDS"],
        wrapper=wrapper,
        rank=p["RANK"] if rank is None else rank,
        alpha=p["ALPHA"] if rank is None else alpha_at(rank, p),
        lr=lr,
        epochs=p["FT_EPOCHS"],
        batch_size=p["BATCH_SIZE"],
        evaluate_on=evaluate_on,
        log=None,
    )


def choose_rates(pretrained, task, methods: dict, p: dict, rates=RATES, rank=None) -> dict:
    """Each method ({name: wrapper}) at each rate, scored on the validation set: the best mean
    wins. Returns {"rates", "validation": {method: {rate: [mean, std]}}, "chosen": {method:
    rate}, "table"}; prints the table's rows as they come. ``rank``: see ``fine_tune``."""
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    lines = [f"{'lr':>8}" + "".join(f"{name:>18}" for name in methods)]
    heading = f"validation accuracy (%), mean ± std over {len(p['SEEDS'])} seeds"
    if rank is not None:
        heading += f", rank {rank}, alpha {alpha_at(rank, p):g}"
    print(heading, flush=True)
    print(lines[0], flush=True)
    for lr in rates:
        cells = []
        for name, wrapper in methods.items():
            acc = fine_tune(pretrained, task, wrapper, lr, p, rank=rank).final
            scores[name][f"{lr:g}"] = [float(acc.mean()), float(acc.std(ddof=1))]
            cells.append(f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}")
        lines.append(f"{lr:>8g}" + "".join(f"{cell:>18}" for cell in cells))
        print(lines[-1], flush=True)
    chosen = {name: float(max(s, key=lambda lr: s[lr][0])) for name, s in scores.items()}
    table = "\n".join([heading, *lines])
    return {"rates": list(rates), "validation": scores, "chosen": chosen, "table": table}


def other_ranks(p: dict) -> list[int]:
    """Where rates are also chosen: rank 1 and the top of the notebook's sweep (not RANK)."""
    return sorted({1, p["RANKS"][-1]} - {p["RANK"]})


def main() -> None:
    start = time.perf_counter()
    nb = import_notebook_definitions()
    p = protocol(nb)  # the notebook's settings, saved with the result
    mnist, rotated = tasks(p, helpers.pick_device())
    pretrained = helpers.make_mlp(tuple(p["SIZES"]), seed=0)
    epochs, lr, batch = p["PRETRAIN_EPOCHS"], p["PRETRAIN_LR"], p["BATCH_SIZE"]
    nb.train_one_model(pretrained, mnist, epochs, lr, batch)  # the notebook's own loop
    methods = {"full FT": None, "LoRA": nb.LinearWithLoRA, "DoRA": nb.LinearWithDoRA}
    result = {"protocol": p, **choose_rates(pretrained, rotated, methods, p)}
    adapters = {name: wrapper for name, wrapper in methods.items() if wrapper is not None}
    result["by_rank"] = {
        str(rank): {
            "rank": rank,
            "alpha": alpha_at(rank, p),
            **choose_rates(pretrained, rotated, adapters, p, rank=rank),
        }
        for rank in other_ranks(p)
    }
    result["seconds"] = time.perf_counter() - start
    write_json(RESULTS, result)
    print("chosen:", result["chosen"])
    for rank, choice in result["by_rank"].items():
        print(f"chosen at rank {rank}:", choice["chosen"])
    print(f"saved {RESULTS.relative_to(REPO)} ({result['seconds'] / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
