"""Part III's layers on a bfloat16 or float16 base: float32 adapters that train, merges that round
once, weight decay that leaves m alone, a factored norm that stays bounded, and the checker's
two low-precision checks (11: m trains, 12: merge precision)."""

import copy
import functools

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial.check_dora import check_dora, peft_dora_factory, peft_unavailable_reason

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


def adapter_tensors(layer):
    return [t for n, t in layer.named_parameters() if n.startswith("lora.") or n == "m"]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("cls_name", LINEAR + CONV)
def test_float32_adapters_on_a_half_precision_base(nb, cls_name, dtype):
    layer = getattr(nb, cls_name)(base_layer(cls_name, dtype), rank=2, alpha=4)
    assert {t.dtype for t in adapter_tensors(layer)} == {torch.float32}
    y = layer(inputs(cls_name, dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert layer.merged_weight().dtype == dtype  # W' is the base's weight, rounded once
    if cls_name == "DoRALinear":  # k = m / ||V||, kept between eval calls: float32
        with torch.no_grad():
            layer.eval()(inputs(cls_name, dtype))
        assert layer.cache.value.dtype == torch.float32
    opted_out = getattr(nb, cls_name)(base_layer(cls_name, dtype), 2, 4, adapter_dtype=dtype)
    assert {t.dtype for t in adapter_tensors(opted_out)} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_full_precision_bases_keep_their_dtype(nb, dtype):
    layer = nb.DoRALinear(base_layer("DoRALinear", dtype), rank=2, alpha=4)
    assert {t.dtype for t in adapter_tensors(layer)} == {dtype}


@pytest.mark.parametrize("bad", [torch.int32, "float32", 32])
def test_a_bad_adapter_dtype_is_refused_clearly(nb, bad):
    with pytest.raises(ValueError, match="adapter_dtype must be a floating torch.dtype"):
        nb.DoRALinear(nn.Linear(4, 3), 1, 1, adapter_dtype=bad)


def train_m(nb, cls_name, base_dtype, **kwargs):
    """m before and after 20 Adam steps at lr 1e-4 (helpers.magnitude_moves)."""
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


def test_m_in_bfloat16_does_not_train_and_in_float16_turns_nan(nb):
    """What float32 adapters prevent: the failure the notebook shows, in numbers."""
    moved, finite, _ = train_m(nb, "DoRALinear", torch.bfloat16, adapter_dtype=torch.bfloat16)
    assert moved == 0.0 and finite
    _, finite, _ = train_m(nb, "DoRALinear", torch.float16, adapter_dtype=torch.float16)
    assert not finite


def small_update(layer, std=1e-3):
    torch.manual_seed(2)
    with torch.no_grad():
        layer.lora.B.normal_(std=std)
        if hasattr(layer, "m"):
            layer.m.mul_(1 + 0.01 * torch.randn_like(layer.m))
    return layer


@pytest.mark.parametrize("cls_name", LINEAR + CONV)
def test_merging_on_bfloat16_rounds_once(nb, cls_name, record_property):
    """The merge error relative to the update's norm equals that of rounding the exact W' once
    (reported as a property: pytest --junitxml shows it); W' built in bfloat16 step by step
    loses clearly more, so the comparison can tell the two apart."""
    layer = small_update(getattr(nb, cls_name)(base_layer(cls_name, torch.bfloat16), 2, 4))
    W0 = layer.conv.weight if cls_name in CONV else layer.linear.weight
    exact = copy.deepcopy(layer).double().merged_weight()  # float64, the same parameters
    lost, least = helpers.merge_error(layer.merged_weight().detach(), exact, W0)
    record_property("update_lost", lost)
    record_property("update_lost_rounding_once", least)
    assert 0 < least and lost <= 1.01 * least
    if cls_name == "DoRALinear":
        with torch.no_grad():
            V = W0 + layer.lora.delta_weight().to(W0.dtype)
            naive = layer.m.to(W0.dtype)[:, None] * V / V.norm(dim=1, keepdim=True)
        naive_lost, _ = helpers.merge_error(naive, exact, W0)
        assert naive_lost > 1.5 * least


def test_the_merged_nn_linear_holds_the_rounded_w(nb):
    layer = small_update(nb.DoRALinear(base_layer("DoRALinear", torch.bfloat16), 2, 4))
    merged = nb.merge(layer)
    assert merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, layer.merged_weight())


def test_adamw_leaves_m_and_biases_out_of_weight_decay(nb):
    """Decay alone (zero gradients) shrinks A and B but neither m nor the bias; AdamW over all
    parameters shrinks m, which is what the groups are for."""
    torch.manual_seed(0)
    layer = nb.DoRALinear(nn.Linear(8, 5), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora.B.normal_()
    start = copy.deepcopy(layer.state_dict())

    def steps(optimizer):
        for _ in range(5):
            optimizer.zero_grad()
            (0.0 * layer(torch.randn(3, 8)).sum()).backward()  # gradients all zero
            optimizer.step()

    steps(helpers.adamw(layer, lr=0.1, weight_decay=0.5))
    now = copy.deepcopy(layer.state_dict())
    assert torch.equal(now["m"], start["m"]) and torch.equal(
        now["linear.bias"], start["linear.bias"]
    )
    for name in ("lora.A", "lora.B", "linear.weight"):
        assert now[name].norm() < 0.9 * start[name].norm(), name
    steps(torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5))
    assert (layer.m.detach() < now["m"]).all()


def test_adamw_finds_peft_magnitudes_by_name():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    model = nn.Module()
    model.lora_magnitude_vector = nn.ModuleDict({"default": Holder()})
    model.lora_A = nn.Linear(3, 2, bias=False)
    optimizer = helpers.adamw(model, lr=0.1)
    decayed, kept = optimizer.param_groups
    assert kept["params"] == [model.lora_magnitude_vector["default"].weight]
    assert decayed["params"] == [model.lora_A.weight] and kept["weight_decay"] == 0.0


def cancelling(shrink, dtype=torch.float32):
    """W0 (6, 40) and a rank-1 update that shrinks row 0 to `shrink` times its length."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 40, generator=g, dtype=dtype)
    A = W0[:1].clone()  # (1, in): the update's direction is row 0's
    B = torch.zeros(6, 1, dtype=dtype)
    B[0, 0] = -(1 - shrink) / 2.0  # s = 2: V[0] = W0[0] - (1 - shrink) W0[0]
    B[1:, 0] = 0.01 * torch.randn(5, generator=g, dtype=dtype)
    return W0, A, B, 2.0


def test_factored_norm_is_bounded_where_the_sum_cancels(nb):
    """Row 0 shrinks to 1e-5 of its length: in float32 the factored sum is pure rounding there
    (about 1e-7 ||W0[0]||^2, possibly negative, which the EPS floor turned into k = m * 1e12);
    it is now floored at float32's rounding of ||W0[0]||^2, about 3e-4 ||W0[0]||."""
    W0, A, B, s = cancelling(1e-5)
    norm = nb.factored_row_norm(W0, A, B, s)
    w0 = W0.norm(dim=1)
    assert torch.isfinite(norm).all()
    floor = torch.finfo(torch.float32).eps ** 0.5 * w0[0]
    assert floor * 0.99 <= norm[0] <= 10 * floor  # bounded: k = m / norm at most ~3e3 m / ||W0||
    dense = nb.row_norm(W0.double() + s * (B.double() @ A.double()))
    torch.testing.assert_close(norm[1:].double(), dense[1:], rtol=1e-5, atol=0)


@pytest.mark.parametrize("shrink", [0.3, 0.05])
def test_factored_norm_matches_dense_above_the_floor(nb, shrink):
    """Moderate cancellation: the error grows like u ||W0||^2 / ||V||^2, still small here."""
    W0, A, B, s = cancelling(shrink)
    exact = nb.row_norm(W0.double() + s * (B.double() @ A.double()))
    got = nb.factored_row_norm(W0, A, B, s).double()
    assert ((got - exact).abs() / exact).max() < 2e-7 / shrink**2


def test_factored_norm_in_float64_is_not_floored_in_practice(nb):
    W0, A, B, s = cancelling(1e-5, torch.float64)
    exact = nb.row_norm(W0 + s * (B @ A))
    torch.testing.assert_close(nb.factored_row_norm(W0, A, B, s), exact, rtol=1e-5, atol=0)


def test_checker_finds_m_that_does_not_train(nb):
    report = check_dora(functools.partial(nb.DoRALinear, adapter_dtype=torch.bfloat16))
    detail = {r.number: r for r in report.results}
    assert detail[11].status == "fail" and detail[11].numbers["m_moved_bfloat16"] == 0.0
    text = " ".join(detail[11].detail.split())
    assert "the magnitude does not train" in text and "Keep A, B and m in float32" in text
    assert detail[12].status == "pass"  # merged_weight() computes in float32 whatever m's dtype
    assert report.exit_status == 3  # float64 checks see bfloat16 adapters at init (check 1)


def test_checker_passes_the_practitioners_layers(nb):
    for factory, kind in [(nb.DoRALinear, "linear"), (nb.Conv2dWithDoRA, "conv2d")]:
        results = {r.number: r for r in check_dora(factory, kind=kind).results}
        assert results[11].status == results[12].status == "pass"
        assert results[11].numbers["m_moved_float16"] == 1.0
        assert (
            results[12].numbers["update_lost"]
            <= 1.01 * (results[12].numbers["update_lost_rounding_once"])
        )


def test_checker_passes_peft_with_its_defaults():
    reason = peft_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    results = {r.number: r for r in check_dora(peft_dora_factory).results}
    assert results[11].status == results[12].status == "pass"
    assert "merge_and_unload()" in results[12].detail
