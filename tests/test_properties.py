"""Property-based tests (hypothesis) over random shapes, ranks, alphas and inputs."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import helpers
from support import rel

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def layer_setups(draw):
    n_in = draw(st.integers(1, 48))
    n_out = draw(st.integers(1, 48))
    return {
        "n_in": n_in,
        "n_out": n_out,
        "rank": draw(st.integers(1, min(n_in, n_out))),
        "alpha": draw(st.floats(0.1, 64.0)),
        "tokens": draw(st.integers(1, 9)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(nb, cls_name, s, dtype=torch.float64, trained=False, **kwargs):
    torch.manual_seed(s["seed"])
    base = nn.Linear(s["n_in"], s["n_out"], bias=s["bias"], dtype=dtype)
    layer = getattr(nb, cls_name)(base, s["rank"], s["alpha"], **kwargs)
    if trained:
        with torch.no_grad():
            layer.lora.B.normal_(std=0.5)
            if hasattr(layer, "m"):
                layer.m.mul_(torch.rand_like(layer.m) + 0.5)
    x = torch.randn(s["tokens"], s["n_in"], dtype=dtype)
    return base, layer, x


CLASSES = st.sampled_from(["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])


@SETTINGS
@given(s=layer_setups(), cls_name=CLASSES)
def test_identity_at_init(nb, s, cls_name):
    base, layer, x = build(nb, cls_name, s)
    assert rel(layer(x), base(x)) < 1e-12
    if cls_name == "LinearWithLoRA":
        assert torch.equal(layer(x), base(x))


@SETTINGS
@given(s=layer_setups(), cls_name=CLASSES)
def test_merged_equals_unmerged(nb, s, cls_name):
    _, layer, x = build(nb, cls_name, s, trained=True)
    merged = nb.merge(layer)
    assert type(merged) is nn.Linear
    assert rel(merged(x), layer(x)) < 1e-10
    model = helpers.merge_adapters(nn.Sequential(layer), nb.merge)
    assert type(model[0]) is nn.Linear and rel(model(x), layer(x)) < 1e-10


@SETTINGS
@given(s=layer_setups(), detach=st.booleans(), factored=st.booleans())
def test_efficient_equals_textbook(nb, s, detach, factored):
    _, book, x = build(nb, "LinearWithDoRA", s, trained=True, detach_norm=detach)
    _, fast, _ = build(nb, "DoRALinear", s, detach_norm=detach, factored_norm=factored)
    fast.load_state_dict(book.state_dict())
    y_book, y_fast = book(x), fast(x)
    assert rel(y_fast, y_book) < 1e-10
    params = ["lora.A", "lora.B", "m"]
    g_book = torch.autograd.grad(y_book.sum(), [book.get_parameter(n) for n in params])
    g_fast = torch.autograd.grad(y_fast.sum(), [fast.get_parameter(n) for n in params])
    # Absolute floor: with n_in = 1 the exact gradient of A and B is 0 (rounding gives ~1e-16).
    # The factored norm sums ||W0[n]||^2 + 2s<W0[n], (BA)[n]> + s^2 ||(BA)[n]||^2: for a row V[n]
    # much shorter than its two terms that sum cancels, and its rounding grows by their ratio.
    # Without detaching, the efficient layer's gradient is the difference of two terms of size
    # about m / ||V[n]|| (through k and through x V^T) that cancel exactly when n_in = 1: its
    # rounding grows by the same ratio (found by hypothesis: n_in = 1, ||V[n]|| = 0.003, ratio
    # 2e5, an error of 5e-10 where the exact gradient is 0).
    atol = 1e-10
    if factored or not detach:
        with torch.no_grad():
            w0, delta = book.linear.weight, book.lora.delta_weight()
            terms = w0.square().sum(1) + delta.square().sum(1)
            atol = max(atol, 1e-12 * float((terms / (w0 + delta).square().sum(1)).max()))
    for name, a, b in zip(params, g_fast, g_book, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=atol, msg=name)
