"""The notebook's LoRA and DoRA layers against their definitions (the official code and PEFT:
norm over output rows, m = ||W0|| at init, s = alpha / r, bias not rescaled, norm detached), and
edge cases: all-zero weight rows, moving layers, torch.compile."""

import copy
import math
import os

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


@pytest.mark.parametrize("key", [*LINEAR, "Conv2dWithLoRA", "Conv2dWithDoRA"])
def test_a_is_initialised_as_nn_linear_and_peft_do(nb, key):
    """kaiming_uniform_(a=sqrt(5)) on A's fan-in (a kernel's: in / groups * kh * kw); the rest
    of the start (B = 0, m = ||W0||, s = alpha / r) the formula tests check."""
    torch.manual_seed(0)
    base, fan_in = (nn.Conv2d(6, 8, 3, groups=2), 27) if "Conv" in key else (nn.Linear(64, 32), 64)
    bound = 1 / math.sqrt(fan_in)
    assert bound >= make_layer(nb, key, base, 4, 12).lora.A.abs().max() > 0.8 * bound


LIN, CONV = ["LoRALinear", "DoRALinear"], ["Conv2dWithLoRA", "Conv2dWithDoRA"]
INVALID = [  # Part III's linear layers and the convolution layers check their arguments
    (LIN + CONV, None, dict(rank=0), ValueError, "positive int"),
    (LIN + CONV, None, dict(rank=2.0), ValueError, "positive int"),
    (LIN, None, dict(rank=17), ValueError, "exceeds"),
    (CONV, nn.Conv2d(3, 8, 3), dict(rank=9), ValueError, "exceeds"),
    (LIN + CONV, None, dict(alpha=0), ValueError, "alpha"),
    (CONV, nn.Conv2d(4, 6, 3, groups=2), dict(rank=3), ValueError, "multiple of groups"),
    (CONV, nn.Conv2d(3, 8, 3, padding_mode="reflect"), {}, ValueError, "padding_mode"),
    (LIN, nn.Conv2d(3, 8, 3), {}, TypeError, "nn.Linear"),
    (CONV, nn.Conv1d(3, 8, 3), {}, TypeError, "nn.Conv2d"),
    (CONV, nn.Linear(32, 16), {}, TypeError, "LinearWith"),
    (["DoRALinear"], None, dict(adapter_dtype=torch.int32), ValueError, "floating torch.dtype"),
]


@pytest.mark.parametrize("classes, base, kwargs, error, match", INVALID)
def test_invalid_arguments(nb, classes, base, kwargs, error, match):
    for cls in classes:
        default = nn.Linear(32, 16) if "Linear" in cls else nn.Conv2d(3, 8, 3)
        with pytest.raises(error, match=match):
            getattr(nb, cls)(base or default, **{"rank": 2, "alpha": 8, **kwargs})


@pytest.mark.parametrize("key", ["LinearWithDoRA", "Conv2dWithDoRA"])  # DoRALinear: test_efficient
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
    g_d, g_e = (
        torch.autograd.grad(y.square().sum(), [m.m, m.lora.A, m.lora.B])
        for m, y in ((detached, y_d), (exact, y_e))
    )
    torch.testing.assert_close(g_d[0], g_e[0], rtol=1e-12, atol=1e-12)  # m's gradient
    assert all((a - b).norm() > 1e-3 * b.norm() for a, b in zip(g_d[1:], g_e[1:], strict=True))


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
    torch.testing.assert_close(y, base(x), rtol=1e-5, atol=1e-6)  # still the identity at init
    y.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora.A, layer.lora.B, layer.m))
    with torch.no_grad():  # after an update the zero rows get a direction from B A
        layer.lora.B.normal_()
        layer.m.add_(1.0)
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.merged_weight()).all()
    assert torch.equal(nb.row_norm(torch.zeros(3, 5)), torch.full((3,), nb.EPS))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY") == "default",
    reason="inductor's vectorized C++ kernels do not compile with ATEN_CPU_CAPABILITY=default",
)
def test_torch_compile_matches_eager(nb):
    """torch.compile (inductor, CPU) on an MLP of the efficient DoRA layer, the one worth
    compiling: same outputs and adapter gradients."""
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
