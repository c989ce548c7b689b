"""What the experiments share: the notebook's tasks, and learning-rate grids that widen."""

from __future__ import annotations

import math

import helpers

STEPS = (1, 2, 5)  # a widened grid goes on in 1-2-5 steps
RATES = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)  # experiments/cnn.py's grid


def tasks(p: dict, device, seed: int = 0):
    """(MNIST, the rotated task with its validation split), as the notebook builds them; ``seed``
    picks the fine-tuning subset and the validation split."""
    data = helpers.load_mnist()
    mnist = helpers.make_task(*data, device=device)
    rotated = helpers.make_task(
        *data,
        device=device,
        degrees=p["ANGLE"],
        n_train=p["FT_TRAIN_SIZE"],
        n_val=p["VAL_SIZE"],
        seed=seed,
    )
    return mnist, rotated


def widen(rates, best: float) -> float | None:
    """The next 1-2-5 rate beyond the grid's edge where the best one sits, else None."""
    rates = sorted(rates)
    if best not in (rates[0], rates[-1]):
        return None
    exponent = math.floor(math.log10(best))
    i = STEPS.index(round(best / 10**exponent))
    if best == rates[-1]:
        exponent, i = (exponent + 1, 0) if i == len(STEPS) - 1 else (exponent, i + 1)
    else:
        exponent, i = (exponent - 1, len(STEPS) - 1) if i == 0 else (exponent, i - 1)
    return float(f"{STEPS[i] * 10.0**exponent:.3g}")


def tune(score, grid) -> dict[float, float]:
    """{rate: score(rate)} over ``grid``, widened until the best rate is not at an edge."""
    scores: dict[float, float] = {}
    pending = list(grid)
    while pending:
        for lr in pending:
            scores[lr] = score(lr)
        best = max(scores, key=scores.get)
        pending = [lr for lr in [widen(scores, best)] if lr is not None]
    return dict(sorted(scores.items()))


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
