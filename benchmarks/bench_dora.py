"""What does DoRA cost next to LoRA, and is our efficient DoRA as cheap as Hugging Face PEFT's?

One training step (forward + backward of ``out.sum()``) is timed for each variant:

* LoRA: the notebook's ``LinearWithLoRA``;
* DoRA textbook: ``LinearWithDoRA`` (builds V and W' = m V / ||V||, backward through W');
* DoRA efficient: ``DoRALinear`` (reuses x W0^T, norm detached), once with the
  factored row norm and once with the norm of V built by one addmm (``factored_norm=True/False``;
  the layer's default picks the factored one from 2**20 weights up, marked "default");
* PEFT DoRA: ``peft.get_peft_model(..., LoraConfig(use_dora=True))`` with the same parameters.

Two configurations: the notebook's MLP (its SIZES, read from DoRA.ipynb) on a batch of
BATCH_SIZE images (whole model wrapped, input without gradient), and one 4096 x 4096 layer on
2048 tokens (a LLaMA-7B projection; its input needs a gradient, as inside a network).
float32; the CPU, or CUDA when available. ``--dtype bfloat16`` (or float16) runs the 4096 x 4096
configuration alone on a base of that dtype: the practitioners' layers (``LoRALinear`` stands in
for LoRA there) and PEFT keep their adapters in float32, Part I's textbook layer in the base's
dtype.

Method: all variants of a configuration live in one process and run interleaved (v1, v2, ...,
v1, v2, ...) after warm-up steps; the median of the repeats is reported. "saved" is
``helpers.saved_tensor_bytes`` of one forward pass: bytes autograd keeps for backward
(activations and intermediates; parameters and inputs excluded). Ratios come from this one run.
The layer classes are the notebook's (``dora_tutorial/notebook.py``), never copies.
Run from the repository root:

    .venv/bin/python -m benchmarks.bench_dora [--repeats 5] [--rank 16] [--dtype bfloat16]

``DORA_DEVICE=cpu`` forces the CPU (see ``helpers.pick_device``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from dora_tutorial.notebook import import_notebook_definitions

REPO = Path(__file__).resolve().parents[1]


LORA, BOOK, FACT, DENSE, PEFT = (
    "LoRA",
    "DoRA textbook",
    "DoRA efficient, factored norm",
    "DoRA efficient, dense norm",
    "PEFT DoRA",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--rank", type=int, default=16, help="rank at 4096 x 4096 (MLP: 4)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens at 4096 x 4096")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the 4096 x 4096 base's dtype; other than float32 it runs that configuration alone",
    )
    return parser.parse_args()


def variants(nb, base: nn.Module, rank: int, alpha: float) -> dict[str, nn.Module]:
    """The five variants of ``base``, all with the same (random, non-zero) adapter parameters.
    On a half-precision base LoRA is ``LoRALinear`` (float32 adapters, like the DoRA layers)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    book = helpers.add_adapters(base, nb.LinearWithDoRA, rank, alpha)
    with torch.no_grad():
        for name, p in book.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(std=0.01)  # a trained-looking update
    models = {
        LORA: helpers.add_adapters(base, lora_class(nb, base), rank, alpha),
        BOOK: book,
        FACT: helpers.add_adapters(base, nb.DoRALinear, rank, alpha, factored_norm=True),
        DENSE: helpers.add_adapters(base, nb.DoRALinear, rank, alpha, factored_norm=False),
    }
    for name in (FACT, DENSE):
        models[name].load_state_dict(book.state_dict())
    models[LORA].load_state_dict(book.state_dict(), strict=False)  # A, B (LoRA has no m)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(**adapter_files.peft_config_kwargs(book))
    )
    set_peft_model_state_dict(peft_model, adapter_files.to_peft_state_dict(book))
    models[PEFT] = peft_model
    return models


def lora_class(nb, base: nn.Module) -> type:
    """Part I's LoRA, or LoRALinear where the layers' own rule keeps float32 adapters."""
    weight = next(base.parameters())
    return (
        nb.LinearWithLoRA if helpers.choose_adapter_dtype(weight) == weight.dtype else nb.LoRALinear
    )


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def clear_grads(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    x.grad = None


def measure(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> dict:
    """Median seconds per step (interleaved) and saved-for-backward bytes, per variant."""
    device = x.device
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            clear_grads(model, x)
            seconds, _ = helpers.timed(lambda m=model: step(m, x), device)
            if i >= warmup:
                times[name].append(seconds)
    results = {}
    for name, model in models.items():
        clear_grads(model, x)
        saved = helpers.saved_tensor_bytes(lambda m=model: m(x).sum())
        results[name] = {"seconds": statistics.median(times[name]), "saved": saved}
    return results


def check_same_outputs(models: dict[str, nn.Module], x: torch.Tensor) -> None:
    """All DoRA variants compute the same function (guards against timing a broken variant)."""
    tol = 1e-4 if x.dtype == torch.float32 else 0.05  # the textbook layer rounds in bf16 / fp16
    with torch.no_grad():
        ref = models[BOOK](x).float()
        for name in (FACT, DENSE, PEFT):
            diff = ((models[name](x).float() - ref).abs().max() / ref.abs().max()).item()
            assert diff < tol, f"{name} differs from the textbook layer by {diff:.1e}"


def report(title: str, results: dict, default: str) -> list[str]:
    """Print the results and the ratios (``default``: the efficient variant the layer picks)."""
    lora = results[LORA]["seconds"]
    label = {name: name + (" (default)" if name == default else "") for name in results}
    print(f"\n{title}")
    print(f"  {'variant':<40}{'ms / step':>11}{'x LoRA':>9}{'saved MiB':>12}")
    for name, r in results.items():
        print(
            f"  {label[name]:<40}{1000 * r['seconds']:>11.1f}{r['seconds'] / lora:>9.2f}"
            f"{r['saved'] / 2**20:>12.2f}"
        )
    fast, peft = results[default], results[PEFT]
    ratios = [
        f"efficient (default) / PEFT DoRA: time {fast['seconds'] / peft['seconds']:.2f}, "
        f"saved bytes {fast['saved'] / peft['saved']:.2f}",
        f"DoRA / LoRA time: efficient {fast['seconds'] / lora:.2f}, "
        f"textbook {results[BOOK]['seconds'] / lora:.2f}, PEFT {peft['seconds'] / lora:.2f}",
    ]
    for line in ratios:
        print("  " + line)
    return [
        f"| {title} | {label[name]} | {1000 * r['seconds']:.1f} | {r['seconds'] / lora:.2f} | "
        f"{r['saved'] / 2**20:.2f} |"
        for name, r in results.items()
    ]


def default_norm(nb, n_in: int, n_out: int) -> str:
    """Which efficient variant ``DoRALinear`` picks by default for this layer size."""
    layer = nb.DoRALinear(nn.Linear(n_in, n_out, device="meta"), 1, 1)
    return FACT if layer.factored_norm else DENSE


def norm_ways(nb, W0: torch.Tensor, lora_A: nn.Linear, lora_B: nn.Linear, s: float) -> dict:
    """Three ways to compute ||W0 + s B A||_row; PEFT's is its own DoraLinearLayer code."""
    from peft.tuners.lora.dora import DoraLinearLayer

    A, B, peft_layer = lora_A.weight, lora_B.weight, DoraLinearLayer(fan_in_fan_out=False)
    return {
        "dense (addmm)": lambda: nb.row_norm(torch.addmm(W0, B, A, alpha=s)),
        "factored": lambda: nb.factored_row_norm(W0, A, B, s),
        "PEFT": lambda: peft_layer.get_weight_norm(
            W0, peft_layer.get_lora_weight(lora_A, lora_B), s
        ),
    }


def norm_times(nb, device: torch.device, repeats: int = 10) -> list[str]:
    """Median ms of the row norm alone (no autograd), per way, at a few layer sizes."""
    lines = []
    for n_out, n_in, rank in [(128, 784, 4), (1024, 1024, 16), (4096, 4096, 16), (4096, 11008, 16)]:
        torch.manual_seed(0)
        W0 = torch.randn(n_out, n_in, device=device)
        lora_A = nn.Linear(n_in, rank, bias=False, device=device)
        lora_B = nn.Linear(rank, n_out, bias=False, device=device)
        ms = {}
        with torch.no_grad():
            for name, fn in norm_ways(nb, W0, lora_A, lora_B, 2.0).items():
                times = [helpers.timed(fn, device)[0] for _ in range(repeats + 2)]
                ms[name] = 1000 * statistics.median(times[2:])
        lines.append(
            f"  {n_out}x{n_in}, r={rank}: "
            + ", ".join(f"{name} {t:.3f} ms" for name, t in ms.items())
        )
    return lines


def main() -> None:
    args = parse_args()
    device = helpers.pick_device()
    nb = import_notebook_definitions()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats} (median), warm-up {args.warmup}"
    )
    rows, dtype = [], getattr(torch, args.dtype)
    if dtype != torch.float32:
        rows += large(nb, args, device, dtype)
        print_readme_table(device, dtype, COLUMNS, rows)
        return
    mlp = helpers.make_mlp(nb.SIZES, seed=0).to(device)  # the notebook's network
    x = torch.randn(nb.BATCH_SIZE, nb.SIZES[0], device=device)
    models = variants(nb, mlp, rank=nb.RANK, alpha=nb.ALPHA)
    check_same_outputs(models, x)
    title = f"MLP {'-'.join(map(str, nb.SIZES))}, batch {nb.BATCH_SIZE}, r={nb.RANK}"
    # every layer of the MLP is below 2**20 weights: the default is the dense norm
    default = default_norm(nb, nb.SIZES[0], nb.SIZES[1])
    rows += report(title, measure(models, x, 10 * args.repeats, 5 * args.warmup), default)

    rows += large(nb, args, device, dtype)

    print("\nRow norm alone (forward, no autograd; median of 10):")
    print("\n".join(norm_times(nb, device)))
    print_readme_table(device, dtype, COLUMNS, rows)


COLUMNS = ["ms / step (fwd+bwd)", "x LoRA", "saved for backward (MiB)"]


def large(nb, args, device, dtype) -> list[str]:
    """The 4096 x 4096 configuration on a base of ``dtype``: its table rows."""
    big = nn.Sequential(nn.Linear(4096, 4096)).to(device, dtype)  # add_adapters wraps children
    x = torch.randn(args.tokens, 4096, device=device, dtype=dtype, requires_grad=True)
    models = variants(nb, big, rank=args.rank, alpha=2 * args.rank)
    check_same_outputs(models, x)
    title = f"4096x4096 {args.dtype}, {args.tokens} tokens, r={args.rank}"
    return report(
        title, measure(models, x, args.repeats, args.warmup), default_norm(nb, 4096, 4096)
    )


def print_readme_table(device, dtype, columns: list[str], rows: list[str]) -> None:
    """The rows as a markdown table for the README (configuration, variant, then ``columns``)."""
    name = str(dtype).removeprefix("torch.")
    print(f"\nREADME table ({device}, base {name}, torch {torch.__version__}):\n")
    print("| configuration | variant | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
