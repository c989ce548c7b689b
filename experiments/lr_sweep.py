"""Where the notebook's learning rates come from: each method's rate, chosen on held-out data.

    .venv/bin/python experiments/lr_sweep.py

Reads the protocol from DoRA.ipynb (network, pretraining, rotated task, seeds, epochs, batch
size, rank, alpha: ``tools/notebook_definitions.py``), pretrains as the notebook does, then
fine-tunes with full fine-tuning, LoRA and DoRA at each rate in ``RATES``, every seed at once,
and measures accuracy on the validation set: rotated training digits disjoint from the
fine-tuning examples and from the test set. Each method gets the rate with the best mean
validation accuracy; the test set is never looked at. Writes experiments/lr_sweep.json (the
protocol it ran, the table, the chosen rates), which the notebook reads. Accuracy only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import helpers  # noqa: E402
from tools.files import write_atomic  # noqa: E402
from tools.notebook_definitions import import_notebook_definitions, protocol  # noqa: E402

RATES = (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
RESULTS = Path(__file__).with_name("lr_sweep.json")


def main() -> None:
    nb = import_notebook_definitions()
    p = protocol(nb)  # the notebook's settings, saved with the result
    data = helpers.load_mnist()
    device = helpers.pick_device()
    mnist = helpers.make_task(*data, device=device)
    rotated = helpers.make_task(
        *data,
        device=device,
        degrees=p["ANGLE"],
        n_train=p["FT_TRAIN_SIZE"],
        n_val=p["VAL_SIZE"],
        seed=0,
    )
    pretrained = helpers.make_mlp(tuple(p["SIZES"]), seed=0)
    helpers.train(
        pretrained,
        mnist,
        epochs=p["PRETRAIN_EPOCHS"],
        lr=p["PRETRAIN_LR"],
        batch_size=p["BATCH_SIZE"],
        log=None,
    )
    methods = {"full FT": None, "LoRA": nb.LinearWithLoRA, "DoRA": nb.LinearWithDoRA}
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    lines = [f"{'lr':>8}" + "".join(f"{name:>18}" for name in methods)]
    print(f"validation accuracy (%), mean ± std over {len(p['SEEDS'])} seeds", flush=True)
    print(lines[0], flush=True)
    for lr in RATES:
        cells = []
        for name, wrapper in methods.items():
            runs = helpers.finetune(
                pretrained,
                rotated,
                seeds=p["SEEDS"],
                wrapper=wrapper,
                rank=p["RANK"],
                alpha=p["ALPHA"],
                lr=lr,
                epochs=p["FT_EPOCHS"],
                batch_size=p["BATCH_SIZE"],
                evaluate_on="val",
                log=None,
            )
            acc = runs.final
            scores[name][f"{lr:g}"] = [float(acc.mean()), float(acc.std(ddof=1))]
            cells.append(f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}")
        lines.append(f"{lr:>8g}" + "".join(f"{cell:>18}" for cell in cells))
        print(lines[-1], flush=True)
    chosen = {name: float(max(s, key=lambda lr: s[lr][0])) for name, s in scores.items()}
    table = "\n".join([f"validation accuracy (%), mean ± std over {len(p['SEEDS'])} seeds", *lines])
    result = {"protocol": p, "rates": list(RATES), "validation": scores, "chosen": chosen}
    result["table"] = table
    write_atomic(RESULTS, [(json.dumps(result, indent=1, ensure_ascii=False) + "\n").encode()])
    print("chosen:", chosen)
    print(f"saved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
