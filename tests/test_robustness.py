"""Edge cases: all-zero weight rows, low-precision inputs, moving/copying layers, torch.compile."""

import copy
import os
import sys

import pytest
import torch
from torch import nn

import helpers
from support import looks_trained

DORA = [("LinearWithDoRA", {}), ("DoRALinear", {"factored_norm": True})]
DORA += [("DoRALinear", {"factored_norm": False})]
ALL = [("LinearWithLoRA", {}), *DORA]
IDS = ["lora", "dora", "dora-eff-factored", "dora-eff-dense"]
# What Part III's layers add: a floored norm, computing in the weights' dtype
GUARDED = [("DoRALinear", {"factored_norm": True}), ("DoRALinear", {"factored_norm": False})]
GUARDED_ALL = [("LoRALinear", {}), *GUARDED]
GUARDED_IDS = ["lora", "dora-factored", "dora-dense"]


def make(nb, key, kwargs, base, rank=4, alpha=8, **extra):
    return getattr(nb, key)(base, rank, alpha, **kwargs, **extra)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("key, kwargs", GUARDED, ids=GUARDED_IDS[1:])
def test_zero_weight_rows_give_no_nan(nb, key, kwargs, detach):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    with torch.no_grad():
        base.weight[[1, 5]] = 0.0  # as in pruned or damaged checkpoints (PEFT issue #2049)
    layer = make(nb, key, kwargs, base, detach_norm=detach)
    x = torch.randn(4, 16)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, [1, 5]], base.bias.detach()[[1, 5]].expand(4, 2))
    torch.testing.assert_close(y, base(x), rtol=1e-5, atol=1e-6)  # still the identity at init
    y.square().sum().backward()
    for name in ("lora.A", "lora.B", "m"):
        assert torch.isfinite(layer.get_parameter(name).grad).all(), name
    with torch.no_grad():  # after an update the zero rows get a direction from B A
        layer.lora.B.normal_()
        layer.m.add_(1.0)
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.merged_weight()).all()


@pytest.mark.parametrize("key, kwargs", DORA, ids=IDS[1:])
def test_zero_rows_in_the_notebook_norms(nb, key, kwargs):
    W = torch.zeros(3, 5)
    assert torch.equal(nb.row_norm(W), torch.full((3,), nb.EPS))
    norm = nb.factored_row_norm(W, torch.randn(2, 5), torch.zeros(3, 2), 2.0)
    assert torch.isfinite(norm).all() and (norm > 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("key, kwargs", GUARDED_ALL, ids=GUARDED_IDS)
def test_low_precision_inputs_to_float32_layers(nb, key, kwargs, dtype):
    torch.manual_seed(0)
    layer = looks_trained(make(nb, key, kwargs, nn.Linear(64, 32)), 0, b_std=0.1, m_spread=0.0)
    x = torch.randn(2, 7, 64)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 7, 32)
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("key, kwargs", ALL, ids=IDS)
def test_layers_converted_to_low_precision(nb, key, kwargs, dtype):
    torch.manual_seed(0)
    layer = looks_trained(make(nb, key, kwargs, nn.Linear(64, 32)), 0, b_std=0.1, m_spread=0.0)
    x = torch.randn(5, 64)
    reference = layer(x)
    low = copy.deepcopy(layer).to(dtype)
    y = low(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert all(
        p.grad.dtype == dtype and torch.isfinite(p.grad).all()
        for p in low.parameters()
        if p.requires_grad
    )


@pytest.mark.parametrize("key, kwargs", ALL, ids=IDS)
def test_to_dtype_and_meta_device(nb, key, kwargs):
    torch.manual_seed(0)
    layer = looks_trained(make(nb, key, kwargs, nn.Linear(10, 6)), 0, b_std=0.1, m_spread=0.0)
    x = torch.randn(3, 10)
    y64 = copy.deepcopy(layer).to(torch.float64)(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), layer(x), rtol=1e-5, atol=1e-6)
    meta = copy.deepcopy(layer).to("meta")  # no hard-coded device anywhere in the layer
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta(torch.empty(3, 10, device="meta")).shape == (3, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_to_cuda(nb):
    for key, kwargs in ALL:
        torch.manual_seed(0)
        layer = looks_trained(make(nb, key, kwargs, nn.Linear(10, 6)), 0, b_std=0.1, m_spread=0.0)
        x = torch.randn(3, 10)
        expected = layer(x)
        torch.testing.assert_close(layer.to("cuda")(x.cuda()).cpu(), expected)


@pytest.mark.parametrize("key, kwargs", ALL, ids=IDS)
def test_deepcopy_and_state_dict_round_trip(nb, key, kwargs):
    torch.manual_seed(0)
    layer = looks_trained(make(nb, key, kwargs, nn.Linear(10, 6)), 0, b_std=0.1, m_spread=0.0)
    x = torch.randn(3, 10)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x))
    with torch.no_grad():
        twin.lora.B.add_(1.0)
    assert not torch.equal(twin(x), layer(x))  # independent parameters
    torch.manual_seed(1)
    other = make(nb, key, kwargs, nn.Linear(10, 6))
    assert not torch.equal(other(x), layer(x))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    assert set(layer.state_dict()) >= {"linear.weight", "linear.bias", "lora.A", "lora.B"}


def test_state_dict_moves_between_textbook_and_efficient(nb):
    pretrained = helpers.make_mlp((20, 16, 4), seed=0)
    book = looks_trained(helpers.add_adapters(pretrained, nb.LinearWithDoRA, 3, 6))
    fast = helpers.add_adapters(pretrained, nb.DoRALinear, 3, 6)
    fast.load_state_dict(book.state_dict())
    x = torch.randn(5, 20)
    torch.testing.assert_close(fast(x), book(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY") == "default",
    reason="inductor's vectorized C++ kernels do not compile with ATEN_CPU_CAPABILITY=default "
    "('at::vec' has not been declared), a setting that only stands in for another CPU type",
)
def test_torch_compile_matches_eager(nb, monkeypatch):
    """torch.compile (inductor, CPU) on the wrapped MLP: same outputs and adapter gradients.

    One model only (the efficient DoRA layer, the one worth compiling): a cold inductor compile
    of forward and backward takes 15-30 s on a 2-core CPU.
    """
    # Dynamo in torch 2.5 and 2.6 (not 2.14) imports a traced function's module by name to guard
    # on its globals: the notebook's module, built in memory, must be findable in sys.modules.
    monkeypatch.setitem(sys.modules, nb.__name__, nb)
    torch._dynamo.reset()
    pretrained = helpers.make_mlp((32, 24, 16, 10), seed=0)
    eager = looks_trained(helpers.add_adapters(pretrained, nb.DoRALinear, 4, 8, factored_norm=True))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(6, 32)
    y_c = compiled(x)
    y_c.square().sum().backward()
    y_e = eager(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
