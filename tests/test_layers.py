"""The notebook's LoRA and DoRA layers against their definitions (the official code and PEFT:
norm over output rows, m = ||W0|| at init, s = alpha / r, bias not rescaled, norm detached)."""

import math

import pytest
import torch
from torch import nn

import helpers
from support import looks_trained, rel

LAYERS = {  # the notebook's linear layers; DoRALinear with either norm
    "LinearWithLoRA": ("LinearWithLoRA", {}),
    "LoRALinear": ("LoRALinear", {}),
    "LinearWithDoRA": ("LinearWithDoRA", {}),
    "DoRALinear-factored": ("DoRALinear", {"factored_norm": True}),
    "DoRALinear-dense": ("DoRALinear", {"factored_norm": False}),
}


def make(nb, key, base, rank, alpha, **kwargs):
    cls, options = LAYERS.get(key, (key, {}))
    return getattr(nb, cls)(base, rank, alpha, **options, **kwargs)


# (n_in, n_out, rank): the edges too (one input, one output, full rank)
SHAPES = [(40, 24, 5), (1, 6, 1), (7, 1, 1), (10, 10, 10)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("key", list(LAYERS))
def test_identity_at_init_then_formula_and_merge(nb, key, shape, bias):
    """Trained: y = x W'^T + b, V = W0 + (alpha/r) B A, W' = V (LoRA) or m V / ||V||_row (DoRA),
    computed here independently; merge() gives an nn.Linear with the same function."""
    torch.manual_seed(0)
    n_in, n_out, rank = shape
    base = nn.Linear(n_in, n_out, bias=bias).double()
    layer = make(nb, key, base, rank, 7)
    x = torch.randn(9, n_in, dtype=torch.float64)
    if "LoRA" in key:  # the identity at init: B = 0, m = ||W0||
        assert torch.equal(layer(x), base(x)) and not layer.lora.B.any()
    else:
        torch.testing.assert_close(layer(x), base(x), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(layer.m, base.weight.norm(dim=1))
    looks_trained(layer, b_std=0.5, m_spread=0.5)
    W0, A, B = (t.detach() for t in (base.weight, layer.lora.A, layer.lora.B))
    W = V = W0 + (7 / rank) * B @ A
    if "DoRA" in key:
        W = layer.m.detach()[:, None] * V / torch.sqrt((V * V).sum(dim=1, keepdim=True))
    expected = x @ W.T + (base.bias.detach() if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)
    merged = nb.merge(layer)
    assert type(merged) is nn.Linear and rel(merged(x), layer(x)) < 1e-10
    model = helpers.merge_adapters(nn.Sequential(layer), nb.merge)
    assert type(model[0]) is nn.Linear and rel(model(x), layer(x)) < 1e-10
    if "DoRA" in key and shape == SHAPES[0]:  # the dim=0 mix-up (per input column) differs
        W_col = layer.m.detach()[:, None] * V / torch.sqrt((V * V).sum(dim=0, keepdim=True))
        assert not torch.allclose(layer.merged_weight(), W_col, rtol=1e-3)


BASES = {  # base layer, A's shape, B's shape, fan-in of A's init (rank 4, alpha 12)
    "linear": (lambda: nn.Linear(64, 32), (4, 64), (32, 4), 64),
    "conv": (lambda: nn.Conv2d(6, 8, 3, groups=2), (4, 3, 3, 3), (8, 2, 1, 1), 27),
}
INIT = [(k, "linear") for k in LAYERS] + [(k, "conv") for k in ("Conv2dWithLoRA", "Conv2dWithDoRA")]


@pytest.mark.parametrize("key, base", INIT)
def test_init_conventions(nb, key, base):
    torch.manual_seed(0)
    make_base, a_shape, b_shape, fan_in = BASES[base]
    conv = make_base()
    layer = make(nb, key, conv, 4, 12)
    assert layer.lora.scaling == 3.0  # alpha / rank
    assert layer.lora.A.shape == a_shape and layer.lora.B.shape == b_shape
    assert not layer.lora.B.any()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on A's fan-in
    assert bound >= layer.lora.A.abs().max() > 0.8 * bound
    if hasattr(layer, "m"):  # one magnitude per OUTPUT row / channel
        assert layer.m.shape == (b_shape[0],) and layer.detach_norm is True
        torch.testing.assert_close(layer.m, conv.weight.detach().flatten(1).norm(dim=1))


def test_a_grouped_rank_may_exceed_one_groups_kernel(nb):
    """The bound is the whole kernel as a matrix: out x (in * kh * kw), all groups together."""
    layer = nb.Conv2dWithDoRA(nn.Conv2d(8, 8, 3, groups=8), rank=8, alpha=8)  # 1 per group
    assert layer.lora.A.shape == (8, 1, 3, 3) and layer.lora.B.shape == (8, 1, 1, 1)


LIN, CONV = ["LoRALinear", "DoRALinear"], ["Conv2dWithLoRA", "Conv2dWithDoRA"]
INVALID = [  # Part III's linear layers and the convolution layers check their arguments
    (LIN + CONV, None, dict(rank=0), ValueError, "positive int"),
    (LIN + CONV, None, dict(rank=2.0), ValueError, "positive int"),
    (LIN, None, dict(rank=True), ValueError, "positive int"),
    (LIN, None, dict(rank=17), ValueError, "exceeds"),
    (CONV, nn.Conv2d(3, 8, 3), dict(rank=9), ValueError, "exceeds"),
    (CONV, nn.Conv2d(1, 4, 1), {}, ValueError, "exceeds"),
    (LIN + CONV, None, dict(alpha=0), ValueError, "alpha"),
    (LIN, None, dict(alpha=float("nan")), ValueError, "alpha"),
    (LIN, None, dict(alpha="8"), ValueError, "alpha"),
    (CONV, nn.Conv2d(4, 6, 3, groups=2), dict(rank=3), ValueError, "multiple of groups"),
    (CONV, nn.Conv2d(3, 8, 3, padding_mode="reflect"), {}, ValueError, "padding_mode"),
    (LIN, nn.Conv2d(3, 8, 3), {}, TypeError, "nn.Linear"),
    (CONV, nn.Conv1d(3, 8, 3), {}, TypeError, "nn.Conv2d"),
    (CONV, nn.Linear(32, 16), {}, TypeError, "LinearWith"),
]


@pytest.mark.parametrize("classes, base, kwargs, error, match", INVALID)
def test_invalid_arguments(nb, classes, base, kwargs, error, match):
    for cls in classes:
        default = nn.Linear(32, 16) if "Linear" in cls else nn.Conv2d(3, 8, 3)
        with pytest.raises(error, match=match):
            getattr(nb, cls)(base or default, **{"rank": 2, "alpha": 8, **kwargs})


@pytest.mark.parametrize("key", ["LinearWithDoRA", "DoRALinear-factored", "Conv2dWithDoRA"])
def test_detach_changes_only_direction_gradients(nb, key):
    """Same parameters, norm detached or not: the same output and gradient of m, other gradients
    of A and B (the norm's derivative is what the detach drops)."""
    torch.manual_seed(0)
    conv = "Conv" in key
    base = (nn.Conv2d(3, 5, 3, 2, 1) if conv else nn.Linear(30, 20)).double().requires_grad_(False)
    x = torch.randn(3, 3, 9, 7, dtype=torch.float64) if conv else torch.randn(11, 30).double()
    detached = looks_trained(make(nb, key, base, 4, 8))
    exact = make(nb, key, base, 4, 8, detach_norm=False)
    exact.load_state_dict(detached.state_dict())
    y_d, y_e = detached(x), exact(x)
    assert torch.equal(y_d, y_e)
    y_d.square().sum().backward()
    y_e.square().sum().backward()
    for name in ("lora.A", "lora.B"):
        g_d, g_e = detached.get_parameter(name).grad, exact.get_parameter(name).grad
        assert (g_d - g_e).norm() > 1e-3 * g_e.norm(), name
    torch.testing.assert_close(detached.m.grad, exact.m.grad, rtol=1e-12, atol=1e-12)
