"""The evidence behind the README (design, usage: experiments/README.md)."""

import json
import os
import subprocess
import sys
import time

import helpers
from dora_tutorial.atomic_write import write_json
from experiments.common import SMOKE, choose, fine_tune, results_path, start, tasks

GRID = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
NETWORKS = 6
ABLATION_RANKS = (1, 4)


def network(nb, p: dict, seed: int, device):
    """Network ``seed``: pretrained on MNIST from that seed, with its own rotated subset."""
    mnist, task = tasks(p, device, seed)
    model = helpers.make_mlp(tuple(p["SIZES"]), seed=seed)
    settings = p["PRETRAIN_EPOCHS"], p["PRETRAIN_LR"], p["BATCH_SIZE"]
    nb.train_one_model(model, mnist, *settings, seed=seed)
    return model, task


def noise_runs(p: dict, lr: float) -> list[float]:
    """Network 0's DoRA at the notebook's rank and rate ``lr``: each seed's final accuracy."""
    nb, _, device = start()  # its settings are ``p``, those of the run it checks
    model, task = network(nb, p, 0, device)
    return fine_tune(model, task, p, nb.LinearWithDoRA, lr, curves=False).final.tolist()


def float_noise(result: dict) -> dict:
    """How far float rounding alone moves a seed: the notebook's DoRA on network 0 again, as a
    CPU of another type computes it: in a subprocess on PyTorch's portable kernels
    (ATEN_CPU_CAPABILITY=default, not AVX2 or AVX-512), pretraining included."""
    p, name = result["protocol"], f"DoRA r{result['protocol']['RANK']}"
    code = (
        "import json, sys; from experiments.evidence import noise_runs; "
        "print(json.dumps(noise_runs(*json.load(sys.stdin))))"
    )
    cmd, args = [sys.executable, "-c", code], json.dumps([p, result["chosen"][name]])
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(cmd, input=args, env=env, capture_output=True, text=True, check=True)
    return {
        "configuration": name,
        "kernels": ["default build", "ATEN_CPU_CAPABILITY=default"],
        "accuracy": [result["accuracy"][0][name], json.loads(out.stdout.splitlines()[-1])],
    }


def main() -> None:
    started = time.perf_counter()
    nb, p, device = start()
    configs = {"full FT": (None, p["RANK"])}  # {name: (layer class or None, rank)}
    for rank in p["RANKS"]:
        configs[f"LoRA r{rank}"] = (nb.LinearWithLoRA, rank)
        configs[f"DoRA r{rank}"] = (nb.LinearWithDoRA, rank)
    for rank in ABLATION_RANKS:
        configs[f"scaled LoRA r{rank}"] = (nb.LinearWithScaledLoRA, rank)
    result = {"protocol": p, "networks": 1 if SMOKE else NETWORKS}
    model, task = network(nb, p, 0, device)
    validation = choose(model, task, p, configs, dict.fromkeys(configs, GRID), curves=False)[0]
    result["validation"] = {n: {lr: m for lr, (m, _) in v.items()} for n, v in validation.items()}
    result["chosen"] = {name: float(max(v, key=v.get)) for name, v in result["validation"].items()}
    result["accuracy"], result["trainable"], result["pretrained"] = [], {}, []
    for seed in range(result["networks"] + 1):  # the last one is held out
        if seed:
            model, task = network(nb, p, seed, device)
        result["pretrained"].append(100 * helpers.accuracy(model, task.test_x, task.test_y))
        accuracy = {}
        for name, (wrapper, rank) in configs.items():
            runs = fine_tune(model, task, p, wrapper, result["chosen"][name], rank, curves=False)
            accuracy[name] = runs.final.tolist()
            result["trainable"][name] = runs.trainable
        result["accuracy"].append(accuracy)
        print(f"network {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)
    result["float_noise"] = float_noise(result)
    result["seconds"] = time.perf_counter() - started
    write_json(results_path("evidence"), result)
    print(f"saved {results_path('evidence')} ({result['seconds'] / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
