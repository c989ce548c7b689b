"""What the experiments share: the notebook's settings, tasks and fine-tuning, rate grids that
widen, and the paired comparisons they save."""

import dataclasses
import math
import sys
import tempfile
from pathlib import Path

import helpers
from dora_tutorial.notebook import import_notebook_definitions, protocol

STEPS = (1, 2, 5)  # a widened grid goes on in 1-2-5 steps
SMOKE = "--smoke" in sys.argv  # tiny sizes, to a temporary file: does it all run? (no results)


def start():
    """The notebook's definitions, its settings (shrunk under --smoke) and the device."""
    nb = import_notebook_definitions()
    p = protocol(nb)
    if SMOKE:
        p.update(FT_TRAIN_SIZE=256, VAL_SIZE=128, SEEDS=p["SEEDS"][:2], MNIST_SIZE=512)
    return nb, p, helpers.pick_device()


def results_path(name: str) -> Path:
    """experiments/<name>.json, or a temporary file under --smoke."""
    return (Path(tempfile.gettempdir()) if SMOKE else Path(__file__).parent) / f"{name}.json"


def tasks(p: dict, device, seed: int = 0):
    """(MNIST, the rotated task with its validation split drawn by ``seed``), as in the notebook."""
    data = [part[: p.get("MNIST_SIZE")] for part in helpers.load_mnist()]  # all but in --smoke
    n = {"n_train": p["FT_TRAIN_SIZE"], "n_val": p["VAL_SIZE"], "seed": seed}
    mnist = helpers.make_task(*data, device=device)
    return mnist, helpers.make_task(*data, device=device, degrees=p["ANGLE"], **n)


def widen(rates, best: float) -> float | None:
    """The next 1-2-5 rate beyond the grid's edge where the best one sits, else None."""
    rates = sorted(rates)
    if best not in (rates[0], rates[-1]):
        return None
    exponent = math.floor(math.log10(best))  # the 1-2-5 ladder around best, which may be off it
    ladder = [s * 10.0**e for e in range(exponent - 1, exponent + 2) for s in STEPS]
    up = best == rates[-1]
    beyond = [r for r in ladder if (r > best * 1.001 if up else r < best / 1.001)]
    return float(f"{(min(beyond) if up else max(beyond)):.3g}")


def tune(score, grid) -> dict[float, float]:
    """{rate: score(rate)} over ``grid``, widened until the best rate is not at an edge."""
    scores = {lr: score(lr) for lr in grid}
    while (lr := widen(scores, max(scores, key=scores.get))) is not None:
        scores[lr] = score(lr)
    return dict(sorted(scores.items()))


def pretrain(model, mnist, rotated, p: dict, epochs: int) -> dict:
    """Pretrain ``model`` on MNIST in place, as the notebook does; its test accuracy (%) on MNIST
    and on the rotated digits."""
    kw = {"epochs": epochs, "lr": p["PRETRAIN_LR"], "batch_size": p["BATCH_SIZE"]}
    runs = helpers.train(model, mnist, **kw)
    on_rotated = 100 * helpers.accuracy(model, rotated.test_x, rotated.test_y)
    return {"mnist": float(runs.final[0]), "rotated": on_rotated}


def fine_tune(pretrained, task, p: dict, wrapper, lr: float, rank: int | None = None, **kw):
    """One method at one rate, every seed at once, as the notebook fine-tunes (at another rank
    with the alpha / rank of its rank sweep)."""
    rank = rank or p["RANK"]
    kw = {"seeds": p["SEEDS"], "epochs": p["FT_EPOCHS"], "batch_size": p["BATCH_SIZE"], **kw}
    kw.update(wrapper=wrapper, rank=rank, alpha=p["ALPHA"] * rank / p["RANK"], lr=lr, log=None)
    return helpers.finetune(pretrained, task, **kw)


def choose(pretrained, task, p: dict, methods: dict, grids: dict, **kw) -> tuple[dict, dict]:
    """Each method ({name: wrapper or (wrapper, rank)}) on the validation split over its grid,
    widened: ({name: {rate: [mean, std]}}, {name: (the best rate, its runs)})."""
    validation, best = {}, {}
    for name, method in methods.items():
        wrapper, rank = method if isinstance(method, tuple) else (method, None)
        scores = validation[name] = {}

        def score(lr, name=name, wrapper=wrapper, rank=rank, scores=scores):
            runs = fine_tune(pretrained, task, p, wrapper, lr, rank, evaluate_on="val", **kw)
            final = runs.final  # each seed's validation accuracy (%)
            mean, std = scores[f"{lr:g}"] = [float(final.mean()), float(final.std(ddof=1))]
            print(f"{name} lr {lr:g}: validation {mean:.2f} ± {std:.2f} %", flush=True)
            if name not in best or mean > best[name][1].final.mean():
                best[name] = (lr, runs)  # the best so far; the others are let go
            return mean

        tune(score, grids[name])
        validation[name] = dict(sorted(scores.items(), key=lambda kv: float(kv[0])))
    return validation, best


def outcome(runs: dict[str, helpers.Runs]) -> dict:
    """The test results as saved: the table, each seed's accuracy, and the notebook's paired
    tests of DoRA against LoRA and of full fine-tuning against DoRA, worded."""
    pairs = ("DoRA", "LoRA"), ("full FT", "DoRA")
    comparisons = [helpers.compare(a, runs[a], b, runs[b]) for a, b in pairs]
    return {
        "table": helpers.results_table(runs),
        "final": {name: [float(a) for a in r.final] for name, r in runs.items()},
        "comparisons": [dataclasses.asdict(c) for c in comparisons],
        "sentences": [c.sentence() for c in comparisons],
    }
