"""What DoRA costs next to LoRA and PEFT's DoRA: a training step, its memory, unmerged inference.
The variants hold the same adapter values; benchmarks/README.md says what each one is."""

import argparse
import contextlib
import copy
from functools import partial

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.helpers import DoraCaching
from torch import nn

import helpers
from benchmarks.common import interleaved, per_call, ratio_rows, setup, table
from dora_tutorial import adapter_files

LORA, BOOK, EFFICIENT, PEFT = "LoRA", "DoRA textbook", "DoRA efficient", "PEFT DoRA"
CONTEXTS = {"PEFT DoRA, DoraCaching": DoraCaching}  # what a variant's calls run in


def variants(nb, base: nn.Module, rank: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    book = helpers.add_adapters(base, nb.LinearWithDoRA, rank, 2 * rank)
    for layer in helpers.adapter_layers(book).values():
        nn.init.normal_(layer.lora.B, std=0.01)  # a trained-looking update
    low = next(base.parameters()).dtype != torch.float32  # LoRALinear keeps float32 adapters
    models = {LORA: nb.LoRALinear if low else nb.LinearWithLoRA, EFFICIENT: nb.DoRALinear}
    models = {k: helpers.add_adapters(base, v, rank, 2 * rank) for k, v in models.items()}
    for model in models.values():  # not strict: LoRA has no m; same_function checks the rest
        model.load_state_dict(book.state_dict(), strict=False)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(**adapter_files.peft_config_kwargs(book)))
    set_peft_model_state_dict(peft, adapter_files.to_peft_state_dict(book))
    return {LORA: models[LORA], BOOK: book, EFFICIENT: models[EFFICIENT], PEFT: peft}


@torch.no_grad()
def same_function(models: dict, x: torch.Tensor) -> None:
    """Each DoRA variant computes the textbook's function, also from what it kept."""
    ref, tol = models[BOOK](x).float(), 1e-4 if x.dtype == torch.float32 else 0.05
    for name in [name for name in models if name != LORA]:
        with CONTEXTS.get(name, contextlib.nullcontext)():
            for _ in range(2):
                diff = ((models[name](x).float() - ref).abs().max() / ref.abs().max()).item()
                assert diff < tol, f"{name} differs from the textbook by {diff:.1e}"


def training(nb, base: nn.Module, x: torch.Tensor, rank: int, repeats: int, title) -> list:
    models = variants(nb, base, rank)
    same_function(models, x)

    def step(model) -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).sum().backward()

    cases = {name: per_call(partial(step, m), x.device) for name, m in models.items()}
    rows = ratio_rows(f"{title}, r={rank}", interleaved(cases, repeats, warmup=0), LORA)
    for row, model in zip(rows, models.values(), strict=True):
        row.append(f"{helpers.saved_tensor_bytes(lambda m=model: m(x).sum()) / 2**20:.2f}")
    return rows


@torch.no_grad()
def inference(nb, base: nn.Module, rank: int, repeats: int, title) -> list:
    models = variants(nb, base, rank)
    timed = {
        LORA: models[LORA].eval(),
        "DoRA textbook, recomputed": models[BOOK].train(),
        "DoRA efficient, recomputed": copy.deepcopy(models[EFFICIENT]).train(),
        "DoRA efficient, k kept": models[EFFICIENT].eval(),
        PEFT: models[PEFT].eval(),
        "PEFT DoRA, DoraCaching": copy.deepcopy(models[PEFT]).eval(),
        "merged": helpers.merge_adapters(models[BOOK], nb.merge).eval(),
    }
    weight, rows = next(base.parameters()), []
    for n in (1, 1024):
        x = torch.randn(n, weight.shape[1], device=weight.device)
        same_function({**timed, BOOK: models[BOOK]}, x)
        cases = {
            name: per_call(partial(m, x), x.device, CONTEXTS.get(name, contextlib.nullcontext))
            for name, m in timed.items()
        }
        seconds = interleaved(cases, repeats, warmup=0)
        rows += ratio_rows(f"{title}, r={rank}, {n} token(s)", seconds, LORA, "merged")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference", action="store_true", help="unmerged inference instead")
    parser.add_argument("--repeats", type=int, help="timed rounds: training 5, inference 15")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    nb, device = setup()
    repeats = args.repeats or (15 if args.inference else 5)
    mlp = helpers.make_mlp(nb.SIZES, seed=0).to(device)
    big = nn.Sequential(nn.Linear(4096, 4096)).to(device)  # add_adapters wraps children
    mlp_title = f"MLP {'-'.join(map(str, nb.SIZES))}"
    if args.inference:
        rows = inference(nb, mlp, nb.RANK, repeats, mlp_title)
        rows += inference(nb, big, 16, repeats, "4096x4096")
        return table(["configuration", "variant", "ms / call", "x LoRA", "x merged"], rows)
    dtype, rows = args.dtype, []
    if dtype == "float32":
        x = torch.randn(nb.BATCH_SIZE, nb.SIZES[0], device=device)
        rows = training(nb, mlp, x, nb.RANK, repeats, f"{mlp_title}, batch {nb.BATCH_SIZE}")
    x = torch.randn(2048, 4096, device=device, dtype=getattr(torch, dtype), requires_grad=True)
    rows += training(nb, big.to(x.dtype), x, 16, repeats, f"4096x4096 {dtype}, 2048 tokens")
    table(["configuration", "variant", "ms / step", "x LoRA", "saved for backward MiB"], rows)


if __name__ == "__main__":
    main()
