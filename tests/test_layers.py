"""The notebook's LoRA and DoRA layers against their definitions (the official code and PEFT:
norm over output rows, m = ||W0|| at init, s = alpha / r, bias not rescaled, norm detached), and
edge cases: all-zero weight rows, moving layers, torch.compile."""

import copy
import math
import os
import sys

import pytest
import torch
from torch import nn

import helpers
from support import LINEAR, looks_trained, make_layer, rel

# (n_in, n_out, rank): the edges too (one input, one output, full rank)
SHAPES = [(40, 24, 5), (1, 6, 1), (7, 1, 1), (10, 10, 10)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("key", LINEAR)
def test_identity_at_init_then_formula_and_merge(nb, key, shape, bias):
    """Trained: y = x W'^T + b, V = W0 + (alpha/r) B A, W' = V (LoRA) or m V / ||V||_row (DoRA),
    computed here independently; merge() gives an nn.Linear with the same function."""
    torch.manual_seed(0)
    n_in, n_out, rank = shape
    base = nn.Linear(n_in, n_out, bias=bias).double()
    layer = make_layer(nb, key, base, rank, 7)
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
INIT = [(k, "linear") for k in LINEAR] + [(k, "conv") for k in ("Conv2dWithLoRA", "Conv2dWithDoRA")]


@pytest.mark.parametrize("key, base", INIT)
def test_init_conventions(nb, key, base):
    torch.manual_seed(0)
    make_base, a_shape, b_shape, fan_in = BASES[base]
    conv = make_base()
    layer = make_layer(nb, key, conv, 4, 12)
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
    (["DoRALinear"], None, dict(adapter_dtype=torch.int32), ValueError, "floating torch.dtype"),
    (["DoRALinear"], None, dict(adapter_dtype="float32"), ValueError, "floating torch.dtype"),
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
    detached = looks_trained(make_layer(nb, key, base, 4, 8))
    exact = make_layer(nb, key, base, 4, 8, detach_norm=False)
    exact.load_state_dict(detached.state_dict())
    y_d, y_e = detached(x), exact(x)
    assert torch.equal(y_d, y_e)
    y_d.square().sum().backward()
    y_e.square().sum().backward()
    for name in ("lora.A", "lora.B"):
        g_d, g_e = detached.get_parameter(name).grad, exact.get_parameter(name).grad
        assert (g_d - g_e).norm() > 1e-3 * g_e.norm(), name
    torch.testing.assert_close(detached.m.grad, exact.m.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("key", ["DoRALinear-factored", "DoRALinear-dense", "Conv2dWithDoRA"])
def test_zero_weight_rows_give_no_nan(nb, key, detach):
    """Pruned or damaged checkpoints (PEFT issue #2049): row_norm's floor keeps 0 / 0 out."""
    torch.manual_seed(0)
    conv = key == "Conv2dWithDoRA"
    base = nn.Conv2d(3, 8, 3) if conv else nn.Linear(16, 8)
    with torch.no_grad():
        base.weight[[1, 5]] = 0.0
    layer = make_layer(nb, key, base, 2, 4, detach_norm=detach)
    x = torch.randn(4, 3, 6, 6) if conv else torch.randn(4, 16)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, base(x), rtol=1e-5, atol=1e-6)  # still the identity at init
    y.square().sum().backward()
    for name in ("lora.A", "lora.B", "m"):
        assert torch.isfinite(layer.get_parameter(name).grad).all(), name
    with torch.no_grad():  # after an update the zero rows get a direction from B A
        layer.lora.B.normal_()
        layer.m.add_(1.0)
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.merged_weight()).all()
    assert torch.equal(nb.row_norm(torch.zeros(3, 5)), torch.full((3,), nb.EPS))


@pytest.mark.parametrize("key", LINEAR)
def test_to_another_dtype_and_device(nb, key):
    """No hard-coded dtype or device anywhere in a layer."""
    torch.manual_seed(0)
    layer = looks_trained(make_layer(nb, key, nn.Linear(10, 6), 4, 8), 0, b_std=0.1, m_spread=0.0)
    x = torch.randn(3, 10)
    y64 = copy.deepcopy(layer).to(torch.float64)(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), layer(x), rtol=1e-5, atol=1e-6)
    meta = copy.deepcopy(layer).to("meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta(torch.empty(3, 10, device="meta")).shape == (3, 6)
    if torch.cuda.is_available():
        torch.testing.assert_close(copy.deepcopy(layer).cuda()(x.cuda()).cpu(), layer(x))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY") == "default",
    reason="inductor's vectorized C++ kernels do not compile with ATEN_CPU_CAPABILITY=default",
)
def test_torch_compile_matches_eager(nb, monkeypatch):
    """torch.compile (inductor, CPU) on an MLP of the efficient DoRA layer, the one worth
    compiling: same outputs and adapter gradients."""
    # Dynamo in torch 2.5 and 2.6 imports a traced function's module by name to guard on its
    # globals: the notebook's module, built in memory, must be findable in sys.modules.
    monkeypatch.setitem(sys.modules, nb.__name__, nb)
    torch._dynamo.reset()
    pretrained = helpers.make_mlp((32, 24, 16, 10), seed=0)
    eager = looks_trained(helpers.add_adapters(pretrained, nb.DoRALinear, 4, 8, factored_norm=True))
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(6, 32)
    y_c = torch.compile(compiled_model)(x)
    y_c.square().sum().backward()
    y_e = eager(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
