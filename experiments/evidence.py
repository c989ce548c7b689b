"""The evidence behind the README: rates tuned at every rank, then several pretrained networks.

    .venv/bin/python -m experiments.evidence        # writes experiments/evidence.json

1. Rates. On the notebook's network and its validation split (rotated training digits, disjoint
   from the fine-tuning examples and the test set), every configuration below gets the rate with
   the best mean validation accuracy over the notebook's seeds. A grid whose best rate is at an
   edge is widened until it is not. The test set is never looked at.
2. Networks. NETWORKS networks, network j pretrained from seed j and fine-tuned on its own subset
   of rotated digits (the task's seed j); on each, every configuration with the notebook's seeds,
   so that seed k of every configuration starts from the same A and sees the same batches. The
   analysis (``dora_tutorial.evidence.pooled``) pairs by seed within a network and combines the
   networks' mean differences, so its intervals cover pretraining and data as well.
3. A held-out network (seed NETWORKS), not in the analysis: the stated results are checked on it.
4. Float noise: the notebook's network and DoRA runs again on PyTorch's portable CPU kernels
   (``--float-noise`` redoes only this): how far another CPU type moves a seed.

The protocol (network, task, seeds, epochs, rank, alpha) is the notebook's (``protocol``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import helpers
from dora_tutorial.atomic_write import write_json
from dora_tutorial.notebook import import_notebook_definitions, protocol
from experiments.common import tasks, tune

RESULTS = Path(__file__).with_name("evidence.json")
GRID = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
NETWORKS = 6
ABLATION_RANKS = (1, 4)


def configurations(nb, p: dict) -> dict[str, tuple]:
    """{name: (layer class or None for full fine-tuning, rank)}."""
    found = {"full FT": (None, p["RANK"])}
    for rank in p["RANKS"]:
        found[f"LoRA r{rank}"] = (nb.LinearWithLoRA, rank)
        found[f"DoRA r{rank}"] = (nb.LinearWithDoRA, rank)
    for rank in ABLATION_RANKS:
        found[f"scaled LoRA r{rank}"] = (nb.LinearWithScaledLoRA, rank)
    return found


def network(nb, p: dict, seed: int, device):
    """Network ``seed``: pretrained on MNIST from that seed, with its own rotated subset."""
    mnist, task = tasks(p, device, seed)
    model = helpers.make_mlp(tuple(p["SIZES"]), seed=seed)
    epochs, lr, batch = p["PRETRAIN_EPOCHS"], p["PRETRAIN_LR"], p["BATCH_SIZE"]
    nb.train_one_model(model, mnist, epochs, lr, batch, seed=seed)
    return model, task


def run(model, task, p, wrapper, rank, lr, evaluate_on="test"):
    return helpers.finetune(
        model,
        task,
        seeds=p["SEEDS"],
        wrapper=wrapper,
        rank=rank,
        alpha=p["ALPHA"] * rank / p["RANK"],  # alpha / r fixed, as the notebook's rank sweep
        lr=lr,
        epochs=p["FT_EPOCHS"],
        batch_size=p["BATCH_SIZE"],
        evaluate_on=evaluate_on,
        curves=False,
        log=None,
    )


def tune_rates(model, task, p, wrapper, rank) -> dict:
    """{rate: mean validation accuracy}, over GRID widened until its best is not at an edge."""
    scores = tune(
        lambda lr: float(run(model, task, p, wrapper, rank, lr, "val").final.mean()), GRID
    )
    return {f"{lr:g}": score for lr, score in scores.items()}


def noise_configuration(p: dict) -> str:
    """The configuration whose float noise is measured: the notebook's DoRA."""
    return f"DoRA r{p['RANK']}"


def other_kernels() -> list[float]:
    """Network 0 and its DoRA runs again, as a CPU of another type would compute them: run in
    a subprocess with ATEN_CPU_CAPABILITY=default (PyTorch's portable kernels, not AVX2 or
    AVX-512), pretraining included. Returns each seed's final accuracy."""
    code = (
        "import json, helpers; from experiments import evidence as e; "
        "from dora_tutorial.notebook import import_notebook_definitions, protocol; "
        "nb = import_notebook_definitions(); p = protocol(nb); d = helpers.pick_device(); "
        "k = e.noise_configuration(p); m, t = e.network(nb, p, 0, d); "
        "w, r = e.configurations(nb, p)[k]; c = json.loads(e.RESULTS.read_text())['chosen'][k]; "
        "print(json.dumps(e.run(m, t, p, w, r, c).final.tolist()))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def float_noise(result: dict) -> dict:
    """How far float rounding alone moves one seed: the same seeds on other CPU kernels."""
    write_json(RESULTS, result)  # the subprocess reads the chosen rate from it
    name = noise_configuration(result["protocol"])
    return {
        "configuration": name,
        "kernels": ["default build", "ATEN_CPU_CAPABILITY=default"],
        "accuracy": [result["accuracy"][0][name], other_kernels()],
    }


def main() -> None:
    if "--float-noise" in sys.argv:  # only that part, into the existing results
        result = json.loads(RESULTS.read_text())
        result["float_noise"] = float_noise(result)
        write_json(RESULTS, result)
        print(f"float noise measured, saved {RESULTS.name}")
        return
    start = time.perf_counter()
    nb = import_notebook_definitions()
    p = protocol(nb)
    device = helpers.pick_device()
    configs = configurations(nb, p)
    result = {"protocol": p, "networks": NETWORKS, "validation": {}, "chosen": {}}

    model, task = network(nb, p, 0, device)
    for name, (wrapper, rank) in configs.items():
        result["validation"][name] = tune_rates(model, task, p, wrapper, rank)
        scores = result["validation"][name]
        result["chosen"][name] = float(max(scores, key=scores.get))
        print(f"{name}: {result['chosen'][name]:g} ({time.perf_counter() - start:.0f} s)")

    result["accuracy"], result["trainable"], result["pretrained"] = [], {}, []
    for seed in range(NETWORKS + 1):  # the last one is held out
        if seed:
            model, task = network(nb, p, seed, device)
        result["pretrained"].append(100 * helpers.accuracy(model, task.test_x, task.test_y))
        accuracy = {}
        for name, (wrapper, rank) in configs.items():
            runs = run(model, task, p, wrapper, rank, result["chosen"][name])
            accuracy[name] = runs.final.tolist()
            result["trainable"][name] = runs.trainable
        result["accuracy"].append(accuracy)
        print(f"network {seed} done ({time.perf_counter() - start:.0f} s)")
    result["float_noise"] = float_noise(result)
    result["seconds"] = time.perf_counter() - start
    write_json(RESULTS, result)
    print(f"saved {RESULTS.name} ({result['seconds'] / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
