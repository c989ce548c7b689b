"""The DoRA layers' InferenceCache: W' (textbook) or m / ||V|| (efficient) kept between eval
calls with autograd off, and never a stale value: every way a parameter can change is tried."""

import copy

import pytest
import torch
from torch import nn

DORA_CLASSES = ["DoRALinear"]  # Part I's layer keeps nothing


def trained_layer(nb, cls, dtype=torch.float64):
    torch.manual_seed(0)
    layer = getattr(nb, cls)(nn.Linear(24, 12).to(dtype), rank=3, alpha=6)
    with torch.no_grad():
        layer.lora.B.normal_()
        layer.m.mul_(1.5)
    return layer


def recomputed(layer, x):
    """The output without the cache: the same layer, training mode (no dropout), no gradients."""
    fresh = copy.deepcopy(layer).train()
    with torch.no_grad():
        return fresh(x)


def eval_call(layer, x):
    layer.eval()
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_eval_without_gradients_keeps_the_value_and_gives_the_same_output(nb, cls):
    layer, x = trained_layer(nb, cls), torch.randn(5, 24, dtype=torch.float64)
    first = eval_call(layer, x)
    kept = layer.cache.value
    assert kept is not None and kept.shape == ((12, 24) if cls == "LinearWithDoRA" else (12,))
    assert torch.equal(eval_call(layer, x), first) and layer.cache.value is kept  # reused
    assert torch.equal(first, recomputed(layer, x))  # bit for bit what the layer computes anyway


CHANGES = {
    "m in place": lambda layer: layer.m.mul_(2),
    "A in place": lambda layer: layer.lora.A.add_(0.1),
    "B in place": lambda layer: layer.lora.B.mul_(-1),
    "W0 in place": lambda layer: layer.linear.weight.mul_(0.5),
    "load_state_dict": lambda layer: layer.load_state_dict(
        {k: v * 1.1 for k, v in layer.state_dict().items()}
    ),
    "m replaced": lambda layer: setattr(layer, "m", nn.Parameter(layer.m * 3)),
    "scaling": lambda layer: setattr(layer.lora, "scaling", layer.lora.scaling * 2),
    "copy_ of new data": lambda layer: layer.lora.B.copy_(torch.randn_like(layer.lora.B)),
    ".data swapped": lambda layer: setattr(layer.lora.A, "data", layer.lora.A.data + 0.1),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_the_output_follows_every_change_of_a_parameter(nb, cls, change):
    layer, x = trained_layer(nb, cls), torch.randn(5, 24, dtype=torch.float64)
    before = eval_call(layer, x)
    with torch.no_grad():
        CHANGES[change](layer)
    after = eval_call(layer, x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, recomputed(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_moving_the_layer_to_another_dtype_is_noticed(nb, cls):
    layer, x = trained_layer(nb, cls, torch.float32), torch.randn(5, 24)
    eval_call(layer, x)
    layer.double()  # same Parameter objects, new storage (version counters unchanged)
    y = eval_call(layer, x.double())
    assert y.dtype == torch.float64 and layer.cache.value.dtype == torch.float64


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_training_and_gradients_bypass_and_drop_the_cache(nb, cls):
    layer, x = trained_layer(nb, cls), torch.randn(5, 24, dtype=torch.float64)
    eval_call(layer, x)
    assert layer.cache.value is not None
    layer(x)  # eval mode, autograd on: the gradient must reach m, A and B
    assert layer.cache.value is None
    layer(x).sum().backward()
    assert all(p.grad is not None for p in (layer.m, layer.lora.A, layer.lora.B))
    eval_call(layer, x)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.cache.value is None  # training mode: nothing kept


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_an_eval_mode_training_loop_with_fused_adam_sees_every_step(nb, cls):
    """Fused optimizers do not bump version counters; the call with gradients that every step
    needs drops the kept value, so validation after a step sees the new parameters."""
    layer, x = trained_layer(nb, cls, torch.float32), torch.randn(16, 24)
    layer.eval()  # e.g. training without dropout
    trainable = [layer.m, layer.lora.A, layer.lora.B]
    optimizer = torch.optim.Adam(trainable, lr=0.1, fused=True)
    for _ in range(3):
        with torch.no_grad():
            validation = layer(x)
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            after = layer(x)
        assert not torch.allclose(after, validation)
        torch.testing.assert_close(after, recomputed(layer, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_inference_mode_then_input_gradients(nb, cls):
    """A value kept under inference_mode is never used where autograd would save it."""
    layer, x = trained_layer(nb, cls), torch.randn(5, 24, dtype=torch.float64)
    layer.eval().requires_grad_(False)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()  # would fail with an inference tensor saved for backward
    assert x.grad is not None


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_vmap_over_stacked_parameters_never_uses_the_cache(nb, cls):
    """torch.func passes stand-ins for the parameters: per-seed values, nothing kept."""
    layers = [trained_layer(nb, cls) for _ in range(3)]
    for k, layer in enumerate(layers):
        with torch.no_grad():
            layer.m.mul_(1 + k)
    names = ["m", "lora.A", "lora.B"]
    stacked = {n: torch.stack([la.get_parameter(n).detach() for la in layers]) for n in names}
    template = layers[0].eval()
    x = torch.randn(5, 24, dtype=torch.float64)
    eval_call(template, x)  # something kept from the template's own parameters

    def call(params, inputs):
        return torch.func.functional_call(template, params, (inputs,))

    with torch.no_grad():  # the inputs batched too, as helpers.train passes them
        out = torch.func.vmap(call)(stacked, x.expand(3, -1, -1))
    for k, layer in enumerate(layers):
        torch.testing.assert_close(out[k], recomputed(layer, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eval_call(template, x), recomputed(template, x))
