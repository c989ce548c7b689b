"""Edge cases: all-zero weight rows, moving layers, torch.compile."""

import copy
import os
import sys

import pytest
import torch
from torch import nn

import helpers
from support import looks_trained

LAYERS = {
    "LinearWithLoRA": ("LinearWithLoRA", {}),
    "LinearWithDoRA": ("LinearWithDoRA", {}),
    "DoRALinear-factored": ("DoRALinear", {"factored_norm": True}),
    "DoRALinear-dense": ("DoRALinear", {"factored_norm": False}),
}


def make(nb, key, base, **extra):
    cls, options = LAYERS[key]
    return getattr(nb, cls)(base, 4, 8, **options, **extra)


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("key", ["DoRALinear-factored", "DoRALinear-dense", "Conv2dWithDoRA"])
def test_zero_weight_rows_give_no_nan(nb, key, detach):
    """Pruned or damaged checkpoints (PEFT issue #2049): row_norm's floor keeps 0 / 0 out."""
    torch.manual_seed(0)
    conv = key == "Conv2dWithDoRA"
    base = nn.Conv2d(3, 8, 3) if conv else nn.Linear(16, 8)
    with torch.no_grad():
        base.weight[[1, 5]] = 0.0
    layer = (
        nb.Conv2dWithDoRA(base, 2, 4, detach_norm=detach)
        if conv
        else make(nb, key, base, detach_norm=detach)
    )
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


@pytest.mark.parametrize("key", list(LAYERS))
def test_to_another_dtype_and_device(nb, key):
    """No hard-coded dtype or device anywhere in a layer."""
    torch.manual_seed(0)
    layer = looks_trained(make(nb, key, nn.Linear(10, 6)), 0, b_std=0.1, m_spread=0.0)
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
