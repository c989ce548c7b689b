"""bfloat16 and float16: float32 adapters on a half-precision base that train, merges that round
once; AdamW that leaves m alone."""

import copy

import pytest
import torch
from torch import nn

import helpers
from support import LINEAR as LINEAR_KEYS
from support import looks_trained, make_layer

HALF = [torch.bfloat16, torch.float16]
LINEAR = ["LoRALinear", "DoRALinear"]
CONV = ["Conv2dWithLoRA", "Conv2dWithDoRA"]


def base_layer(cls_name, dtype, seed=0):
    torch.manual_seed(seed)
    layer = nn.Conv2d(4, 6, 3, padding=1) if cls_name in CONV else nn.Linear(24, 16)
    return layer.to(dtype).requires_grad_(False)


def inputs(cls_name, dtype, seed=1):
    shape = (3, 4, 5, 5) if cls_name in CONV else (8, 24)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def adapter_dtypes(layer):
    return {t.dtype for n, t in layer.named_parameters() if n.startswith("lora.") or n == "m"}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cls_name", LINEAR + CONV)
def test_float32_adapters_on_a_half_precision_base(nb, cls_name, dtype):
    layer = getattr(nb, cls_name)(base_layer(cls_name, dtype), rank=2, alpha=4)
    assert adapter_dtypes(layer) == {torch.float32}
    y = layer(inputs(cls_name, dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert layer.merged_weight().dtype == dtype  # W' is the base's weight, rounded once
    if cls_name == "DoRALinear":  # k = m / ||V||, kept between eval calls: float32
        with torch.no_grad():
            layer.eval()(inputs(cls_name, dtype))
        assert layer.cache.value.dtype == torch.float32
    opted_out = getattr(nb, cls_name)(base_layer(cls_name, dtype), 2, 4, adapter_dtype=dtype)
    assert adapter_dtypes(opted_out) == {dtype}


# a float32 Part III layer fed half inputs, and every linear layer converted with .to(dtype)
HALF_CASES = [(k, dtype, True) for k in LINEAR_KEYS for dtype in HALF]
HALF_CASES += [(k, dtype, False) for k in LINEAR_KEYS if "With" not in k for dtype in HALF]


@pytest.mark.parametrize("key, dtype, converted", HALF_CASES, ids=str)
def test_half_precision_inputs_and_layers(nb, key, dtype, converted):
    """Answers in the input's dtype, near float32; converted, it trains in that dtype."""
    torch.manual_seed(0)
    layer = looks_trained(make_layer(nb, key, nn.Linear(64, 32), 4, 8), 0, b_std=0.1, m_spread=0)
    x = torch.randn(2, 7, 64)
    low = copy.deepcopy(layer).to(dtype) if converted else layer
    y = low(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 7, 32) and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)
    if converted:
        y.float().sum().backward()
        grads = [p.grad for p in low.parameters() if p.requires_grad]
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def train_m(nb, cls_name, base_dtype, **kwargs):
    """m's change over 20 Adam steps at lr 1e-4 (helpers.magnitude_moves)."""
    layer = getattr(nb, cls_name)(base_layer(cls_name, base_dtype), rank=2, alpha=4, **kwargs)
    before = layer.m.detach().double().clone()
    moved, finite = helpers.magnitude_moves(layer, layer.m, inputs(cls_name, base_dtype))
    return moved, finite, layer.m.detach().double() - before


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cls_name", ["DoRALinear", "Conv2dWithDoRA"])
def test_m_trains_on_a_half_precision_base_as_in_float32(nb, cls_name, dtype):
    moved, finite, change = train_m(nb, cls_name, dtype)
    *_, change32 = train_m(nb, cls_name, torch.float32)  # the same base, in float32
    assert moved == 1.0 and finite
    # the same steps up to the base's rounding of the inputs and of x W0^T
    assert (change - change32).norm() < 0.1 * change32.norm()
    # what float32 adapters prevent: m in bfloat16 does not move, in float16 it turns NaN
    moved, finite, _ = train_m(nb, cls_name, dtype, adapter_dtype=dtype)
    assert (moved, finite) == ((0.0, True) if dtype == torch.bfloat16 else (moved, False))


@pytest.mark.parametrize("cls_name", LINEAR + CONV)
def test_merging_on_bfloat16_rounds_once(nb, cls_name):
    """The update lost in a merge equals that of rounding the exact W' once."""
    layer = getattr(nb, cls_name)(base_layer(cls_name, torch.bfloat16), 2, 4)
    looks_trained(layer, 2, b_std=1e-3, m_spread=0.01)
    W0 = layer.conv.weight if cls_name in CONV else layer.linear.weight
    exact = copy.deepcopy(layer).double().merged_weight()  # float64, the same parameters
    W = layer.merged_weight().detach()
    lost, least = helpers.merge_error(W, exact, W0)
    assert 0 < least and lost <= 1.01 * least
    merged = (nb.merge_conv if cls_name in CONV else nb.merge)(layer)
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.weight, W)


def test_adamw_leaves_m_and_biases_out_of_weight_decay(nb):
    """Decay alone (zero gradients) shrinks A, B and W0 but neither m nor the bias."""
    torch.manual_seed(0)
    layer = nb.DoRALinear(nn.Linear(8, 5), rank=2, alpha=4)
    nn.init.normal_(layer.lora.B)
    start = copy.deepcopy(layer.state_dict())
    optimizer = helpers.adamw(layer, lr=0.1, weight_decay=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        (0.0 * layer(torch.randn(3, 8)).sum()).backward()  # gradients all zero
        optimizer.step()
    now = layer.state_dict()
    assert all(torch.equal(now[k], start[k]) for k in ("m", "linear.bias"))
    assert all(now[k].norm() < 0.9 * start[k].norm() for k in ("lora.A", "lora.B", "linear.weight"))
