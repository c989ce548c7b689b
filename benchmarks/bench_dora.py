"""What does DoRA cost next to LoRA, in training and in unmerged inference, and next to PEFT's?

    .venv/bin/python -m benchmarks.bench_dora [--repeats 5] [--rank 16] [--dtype bfloat16]
    .venv/bin/python -m benchmarks.bench_dora --inference [--repeats 15] [--tokens 1 1024]

Variants, all with the same adapter parameters: LoRA (the notebook's ``LinearWithLoRA``, or
``LoRALinear`` where the layers' own rule keeps float32 adapters on a low-precision base), DoRA
textbook (``LinearWithDoRA``, builds W'), DoRA efficient (``DoRALinear`` with its own choice of
row norm) and PEFT's DoRA (``LoraConfig(use_dora=True)``).
Configurations: the notebook's MLP (SIZES, BATCH_SIZE, RANK) and one 4096 x 4096 layer.

Training: one forward + backward of ``out.sum()``, the median of interleaved steps; "saved" is
what autograd keeps for backward (``helpers.saved_tensor_bytes``). ``--dtype bfloat16`` runs the
4096 x 4096 layer alone on a base of that dtype. Then the row norm alone, three ways.

``--inference``: eval mode under ``torch.no_grad()``; "recomputed" is the layer in training mode
(no dropout: the same function), "k kept" the ``InferenceCache`` in use; PEFT also with its
opt-in ``DoraCaching``; "merged" folds every adapter into the base. Rounds in shuffled order of
samples of a few milliseconds each, wall clock (CPU time counts PyTorch's idle spinning threads).
Ratios come from one run; ``DORA_DEVICE=cpu`` forces the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from torch import nn

import helpers
from benchmarks.common import interleaved, readme_table, setup
from dora_tutorial import adapter_files

LORA, BOOK, EFFICIENT, PEFT = "LoRA", "DoRA textbook", "DoRA efficient", "PEFT DoRA"


def variants(nb, base: nn.Module, rank: int, alpha: float) -> dict[str, nn.Module]:
    """The four variants of ``base``, all with the same non-zero adapter parameters."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    book = helpers.add_adapters(base, nb.LinearWithDoRA, rank, alpha)
    with torch.no_grad():
        for name, p in book.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(std=0.01)  # a trained-looking update
    weight = next(base.parameters())
    low = helpers.choose_adapter_dtype(weight) != weight.dtype
    models = {
        LORA: helpers.add_adapters(base, nb.LoRALinear if low else nb.LinearWithLoRA, rank, alpha),
        BOOK: book,
        EFFICIENT: helpers.add_adapters(base, nb.DoRALinear, rank, alpha),  # its default norm
    }
    models[EFFICIENT].load_state_dict(book.state_dict())
    models[LORA].load_state_dict(book.state_dict(), strict=False)  # LoRA has no m
    config = LoraConfig(**adapter_files.peft_config_kwargs(book))
    models[PEFT] = get_peft_model(copy.deepcopy(base), config)
    set_peft_model_state_dict(models[PEFT], adapter_files.to_peft_state_dict(book))
    return models


@torch.no_grad()
def same_function(models: dict, x: torch.Tensor, tol: float, context=None) -> None:
    """Every DoRA variant computes the textbook's function, twice (the second call from what
    the first kept): a broken variant is never timed."""
    ref = models[BOOK](x).float()
    for name, model in models.items():
        with (context or {}).get(name, contextlib.nullcontext)():
            for _ in range(2):
                diff = ((model(x).float() - ref).abs().max() / ref.abs().max()).item()
                assert name == LORA or diff < tol, f"{name} differs by {diff:.1e}"


def training(nb, base: nn.Module, x: torch.Tensor, rank: int, repeats, warmup, title) -> list:
    """Median seconds per step and bytes saved for backward of each variant: table rows."""
    models = variants(nb, base, rank, 2 * rank)
    same_function(models, x, 1e-4 if x.dtype == torch.float32 else 0.05)

    def step(model) -> float:
        model.zero_grad(set_to_none=True)
        x.grad = None
        return helpers.timed(lambda: model(x).sum().backward(), x.device)[0]

    cases = {name: lambda m=m: step(m) for name, m in models.items()}
    seconds = interleaved(cases, repeats, warmup)
    print(f"\n{title}\n  {'variant':<26}{'ms / step':>11}{'x LoRA':>9}{'saved MiB':>12}")
    rows = []
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        saved = helpers.saved_tensor_bytes(lambda m=model: m(x).sum()) / 2**20
        ratio = seconds[name] / seconds[LORA]
        print(f"  {name:<26}{1000 * seconds[name]:>11.1f}{ratio:>9.2f}{saved:>12.2f}")
        rows.append([title, name, f"{1000 * seconds[name]:.1f}", f"{ratio:.2f}", f"{saved:.2f}"])
    return rows


def norm_ways(nb, peft_layer, W0: torch.Tensor, a: nn.Linear, b: nn.Linear) -> dict:
    """||W0 + 2 B A|| per row: dense, factored, and PEFT's own code."""
    return {
        "dense (addmm)": lambda: nb.row_norm(torch.addmm(W0, b.weight, a.weight, alpha=2.0)),
        "factored": lambda: nb.factored_row_norm(W0, a.weight, b.weight, 2.0),
        "PEFT": lambda: peft_layer.get_weight_norm(W0, peft_layer.get_lora_weight(a, b), 2.0),
    }


@torch.no_grad()
def norm_times(nb, device: torch.device, repeats: int = 10) -> None:
    """Median ms of the row norm alone (no autograd), at a few layer sizes."""
    from peft.tuners.lora.dora import DoraLinearLayer

    peft_layer = DoraLinearLayer(fan_in_fan_out=False)
    print(f"\nRow norm alone (forward, no autograd; median of {repeats}):")
    for n_out, n_in, rank in [(128, 784, 4), (1024, 1024, 16), (4096, 4096, 16), (4096, 11008, 16)]:
        torch.manual_seed(0)
        W0 = torch.randn(n_out, n_in, device=device)
        a = nn.Linear(n_in, rank, bias=False, device=device)
        b = nn.Linear(rank, n_out, bias=False, device=device)
        ways = norm_ways(nb, peft_layer, W0, a, b)
        cases = {name: lambda f=f: helpers.timed(f, device)[0] for name, f in ways.items()}
        ms = {k: f"{k} {1000 * t:.3f} ms" for k, t in interleaved(cases, repeats, 2).items()}
        print(f"  {n_out}x{n_in}, r={rank}: " + ", ".join(ms.values()))


def per_call(model, context, x: torch.Tensor, calls: int) -> float:
    """Wall-clock seconds per call over ``calls`` calls."""

    def run():
        for _ in range(calls):
            model(x)

    with context():
        return helpers.timed(run, x.device)[0] / calls


@torch.no_grad()
def inference(nb, base: nn.Module, rank: int, tokens: list[int], repeats: int, title) -> list:
    """Median seconds per unmerged call of each variant, per number of tokens: table rows."""
    from peft.helpers import DoraCaching

    models = variants(nb, base, rank, 2 * rank)
    timed = {
        LORA: models[LORA].eval(),
        "DoRA textbook, recomputed": models[BOOK].train(),
        "DoRA efficient, recomputed": copy.deepcopy(models[EFFICIENT]).train(),
        "DoRA efficient, k kept": models[EFFICIENT].eval(),
        PEFT: models[PEFT].eval(),
        "PEFT DoRA, DoraCaching": copy.deepcopy(models[PEFT]).eval(),
        "merged": helpers.merge_adapters(models[BOOK], nb.merge).eval(),
        BOOK: models[BOOK],  # the reference for same_function, not timed
    }
    context = {"PEFT DoRA, DoraCaching": DoraCaching}
    rows = []
    for n in tokens:
        x = torch.randn(n, next(base.parameters()).shape[1], device=next(base.parameters()).device)
        same_function(timed, x, 1e-4, context)
        cases = {}
        for name, model in list(timed.items())[:-1]:
            with_context = context.get(name, contextlib.nullcontext)
            calls = max(1, min(1000, round(0.02 / max(per_call(model, with_context, x, 2), 1e-7))))
            cases[name] = lambda m=model, c=with_context, k=calls, x=x: per_call(m, c, x, k)
        seconds = interleaved(cases, repeats, warmup=0, shuffle=True)
        label = f"{title}, {n} token{'s' * (n > 1)}"
        print(f"\n{label}\n  {'variant':<30}{'ms / call':>11}{'x LoRA':>9}{'x merged':>10}")
        for name, s in seconds.items():
            lora, merged = s / seconds[LORA], s / seconds["merged"]
            print(f"  {name:<30}{1000 * s:>11.3f}{lora:>9.2f}{merged:>10.2f}")
            rows.append([label, name, f"{1000 * s:.3f}", f"{lora:.2f}", f"{merged:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference", action="store_true", help="unmerged inference instead")
    parser.add_argument("--repeats", type=int, help="timed steps (5) or rounds (15)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--rank", type=int, default=16, help="rank at 4096 x 4096 (MLP: RANK)")
    parser.add_argument("--tokens", type=int, nargs="+", help="training: 2048; inference: 1 1024")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    nb, device = setup()
    mlp = helpers.make_mlp(nb.SIZES, seed=0).to(device)
    big = nn.Sequential(nn.Linear(4096, 4096)).to(device)  # add_adapters wraps children
    mlp_title = f"MLP {'-'.join(map(str, nb.SIZES))}, r={nb.RANK}"
    if args.inference:
        rows = []
        for title, base, rank in [
            (mlp_title, mlp, nb.RANK),
            (f"4096x4096, r={args.rank}", big, args.rank),
        ]:
            rows += inference(nb, base, rank, args.tokens or [1, 1024], args.repeats or 15, title)
        readme_table(str(device), ["ms / call", "x LoRA", "x merged"], rows)
        return
    repeats, tokens, dtype, rows = (
        args.repeats or 5,
        (args.tokens or [2048])[0],
        getattr(torch, args.dtype),
        [],
    )
    if dtype == torch.float32:
        x = torch.randn(nb.BATCH_SIZE, nb.SIZES[0], device=device)
        rows += training(
            nb,
            mlp,
            x,
            nb.RANK,
            10 * repeats,
            5 * args.warmup,
            f"{mlp_title}, batch {nb.BATCH_SIZE}",
        )
    x = torch.randn(tokens, 4096, device=device, dtype=dtype, requires_grad=True)
    title = f"4096x4096 {args.dtype}, {tokens} tokens, r={args.rank}"
    rows += training(nb, big.to(dtype), x, args.rank, repeats, args.warmup, title)
    if dtype == torch.float32:
        norm_times(nb, device)
    readme_table(
        f"{device}, base {args.dtype}",
        ["ms / step (fwd+bwd)", "x LoRA", "saved for backward (MiB)"],
        rows,
    )


if __name__ == "__main__":
    main()
