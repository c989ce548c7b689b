"""The MLP and its adapters: wrapping, counting, effective weights, merging, inference time;
and ``add_to_class``, which lets the notebook explain one class over several cells."""

import copy
import statistics

import torch
from torch import nn

from dora_tutorial.adapter_files import adapter_layers
from dora_tutorial.adapter_files import inside as _inside
from dora_tutorial.runtime import timed


def make_mlp(sizes: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-...-Linear, seeded; inputs are images flattened to rows of 784 pixels."""
    torch.manual_seed(seed)
    shapes = zip(sizes[:-1], sizes[1:], strict=True)
    layers = [m for n_in, n_out in shapes for m in (nn.Linear(n_in, n_out), nn.ReLU())]
    return nn.Sequential(*layers[:-1])  # no ReLU after the last layer


def add_adapters(model: nn.Module, wrapper, rank: int, alpha: float, **kwargs) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` wrapped as ``wrapper(linear, rank, alpha,
    **kwargs)`` (or a dict of wrappers by layer type) and only the adapters trainable. A layer
    gets at most full rank, min(in, out) (a kernel counts in / groups * kh * kw inputs)."""
    wrappers = wrapper if isinstance(wrapper, dict) else {nn.Linear: wrapper}
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    targets = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, tuple(wrappers))]
    if not targets:
        names = " or ".join(f"nn.{kind.__name__}" for kind in wrappers)
        raise ValueError(f"the model has no {names} layers to wrap")
    for name, layer in targets:
        r = min(rank, *layer.weight.flatten(1).shape)  # (out, in), or (out, in/groups*kh*kw)
        make = next(w for kind, w in wrappers.items() if isinstance(layer, kind))
        model = _replace(model, name, make(layer, r, alpha, **kwargs))
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: detached copy of its effective weight}: ``merged_weight()`` of adapter
    layers, the weight of other nn.Linear and nn.Conv2d layers (not those inside adapters)."""
    adapters = adapter_layers(model)
    weights = {}
    for name, module in model.named_modules():
        if name in adapters:
            weights[name] = module.merged_weight().detach().clone()
        elif isinstance(module, nn.Linear | nn.Conv2d) and not _inside(name, adapters):
            weights[name] = module.weight.detach().clone()
    return weights


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """model.<name> = module (dotted names); returns the new root if name is ""."""
    if name == "":
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


def merge_adapters(model: nn.Module, merge) -> nn.Module:
    """A copy of ``model`` with every adapter layer replaced by ``merge(layer)`` (the notebook's
    merge, or a dict of them by adapter class)."""
    merges = merge if isinstance(merge, dict) else {nn.Module: merge}
    model = copy.deepcopy(model)
    for name, layer in adapter_layers(model).items():
        kind = next((kind for kind in merges if isinstance(layer, kind)), None)
        if kind is None:
            raise TypeError(
                f"layer {name!r} is a {type(layer).__name__} and no merge function was given for "
                f"it: add {{{type(layer).__name__}: <its merge function>}} to the dict"
            )
        model = _replace(model, name, merges[kind](layer))
    return model


@torch.inference_mode()
def inference_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model(x)`` in eval and inference mode (device synchronised)."""
    was_training = model.training
    model.eval()
    times = [timed(lambda: model(x), x.device)[0] for _ in range(warmup + repeats)][warmup:]
    model.train(was_training)
    return 1000 * statistics.median(times)


def add_to_class(cls):
    """``@add_to_class(C)`` above a function makes it a method of C: a class explained over
    several notebook cells (as d2l.ai does)."""
    return lambda function: setattr(cls, function.__name__, function) or function
