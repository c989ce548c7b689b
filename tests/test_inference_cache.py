"""DoRALinear's InferenceCache (k = m / ||V|| kept between eval calls with autograd off) is never
stale: every way a parameter can change is tried, layer by layer and in a training loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from support import looks_trained


def trained_layer(nb, dtype=torch.float64):
    torch.manual_seed(0)
    layer = looks_trained(nb.DoRALinear(nn.Linear(24, 12).to(dtype), rank=3, alpha=6))
    return layer, torch.randn(5, 24, dtype=dtype)


def recomputed(layer, x):  # without the cache: a copy in training mode (no dropout)
    with torch.no_grad():
        return copy.deepcopy(layer).train()(x)


def eval_call(module, x):
    module.eval()
    with torch.no_grad():
        return module(x)


CHANGES = {
    "none": lambda layer: None,
    "m in place": lambda layer: layer.m.mul_(2),
    "A in place": lambda layer: layer.lora.A.add_(0.1),
    "B in place": lambda layer: layer.lora.B.mul_(-1),
    "W0 in place": lambda layer: layer.linear.weight.mul_(0.5),
    "load_state_dict": lambda la: la.load_state_dict(
        {k: v * 1.1 for k, v in la.state_dict().items()}
    ),
    "m replaced": lambda layer: setattr(layer, "m", nn.Parameter(layer.m * 3)),
    "scaling": lambda layer: setattr(layer.lora, "scaling", layer.lora.scaling * 2),
    ".data swapped": lambda layer: setattr(layer.lora.A, "data", layer.lora.A.data + 0.1),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_output_follows_every_change_of_a_parameter(nb, change):
    layer, x = trained_layer(nb)
    before = eval_call(layer, x)
    kept = layer.cache.value
    assert kept is not None and kept.shape == (12,)
    with torch.no_grad():
        CHANGES[change](layer)
    after = eval_call(layer, x)
    if change == "none":  # reused, and bit for bit what the layer computes anyway
        assert layer.cache.value is kept and torch.equal(after, before)
        assert torch.equal(after, recomputed(layer, x))
    else:
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, recomputed(layer, x), rtol=1e-12, atol=1e-12)


def test_a_dtype_move_training_gradients_and_inference_mode_are_noticed(nb):
    layer, x = trained_layer(nb, torch.float32)
    eval_call(layer, x)
    layer.double()  # same Parameter objects, new storage (version counters unchanged)
    x = x.double()
    assert eval_call(layer, x).dtype == torch.float64 == layer.cache.value.dtype
    layer(x).sum().backward()  # eval mode, autograd on: the gradient must reach m, A and B
    assert layer.cache.value is None and all(p.grad is not None for p in layer.parameters())
    eval_call(layer, x)
    with torch.no_grad():
        layer.train()(x)
    assert layer.cache.value is None  # training mode: nothing kept
    layer.eval().requires_grad_(False)  # a value kept under inference_mode is never used where
    with torch.inference_mode():  # autograd would save it (an inference tensor would fail)
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_vmap_over_stacked_parameters_never_uses_the_cache(nb):
    """torch.func passes stand-ins for the parameters (as helpers.train does): nothing kept."""
    layers = [trained_layer(nb)[0] for _ in range(3)]
    for k, layer in enumerate(layers):
        with torch.no_grad():
            layer.m.mul_(1 + k)
    names = ["m", "lora.A", "lora.B"]
    stacked = {n: torch.stack([la.get_parameter(n).detach() for la in layers]) for n in names}
    template, x = layers[0], trained_layer(nb)[1]
    eval_call(template, x)  # something kept from the template's own parameters

    def call(params, inputs):
        return torch.func.functional_call(template, params, (inputs,))

    with torch.no_grad():
        out = torch.func.vmap(call)(stacked, x.expand(3, -1, -1))
    for k, layer in enumerate(layers):
        torch.testing.assert_close(out[k], recomputed(layer, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eval_call(template, x), recomputed(template, x))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_model_validated_between_backward_and_step_then_after_it(nb, fused):
    """backward, validate (the kept values fill), step, validate again: the second validation
    and helpers.accuracy see the stepped weights, as the merged model does. A fused step writes
    without bumping version counters: the step hook counts it."""
    model = helpers.add_adapters(helpers.make_mlp((20, 16, 12, 5)).double(), nb.DoRALinear, 3, 5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05, **({"fused": True} if fused else {"foreach": True}))
    for _ in range(3):
        model.train()
        F.cross_entropy(model(x), y).backward()
        before = eval_call(model, x)
        opt.step()
        opt.zero_grad()
        after = eval_call(model, x)
        assert (after - before).abs().max() > 1e-3  # the step changed the function
        merged = eval_call(helpers.merge_adapters(model, nb.merge), x)
        torch.testing.assert_close(after, merged, rtol=1e-12, atol=1e-12)
        accuracy = (merged.argmax(1) == y).double().mean().item()
        assert helpers.accuracy(model, x, y) == pytest.approx(accuracy)
