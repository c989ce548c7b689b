"""The notebook's layers against Hugging Face PEFT (a test dependency, see requirements.txt).

The same MLP is wrapped with our layers and with ``get_peft_model(LoraConfig(...))``; parameters
are copied across with ``adapter_files.to_peft_state_dict``. Compared: forward outputs, the
gradients of A, B and m after one backward pass, and the merged weights.
"""

import copy

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from support import (
    OURS_TO_PEFT,
    PEFT_TOL,
    assert_matches_peft,
    configured,
    looks_trained,
    peft_with_values_of_its_own,
    rel,
)

# peft imports transformers, which can fail with any exception on a torch it does not support
# (NameError with transformers 5 on torch 2.5): skip with the first line of it, not a crash.
try:
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
except Exception as error:
    reason = f"peft cannot be imported: {type(error).__name__}: {error}"
    pytest.skip(reason.splitlines()[0], allow_module_level=True)


CLASSES = {
    "LinearWithLoRA": {},
    "LinearWithDoRA": {},
    "DoRALinear-factored": {"factored_norm": True},
    "DoRALinear-dense": {"factored_norm": False},
}


def mlp(sizes, bias, dtype):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers += [nn.Linear(a, b, bias=bias)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(nn.Flatten(), *layers).to(dtype)


def build(nb, cls_key, sizes, rank, bias, dtype):
    base = mlp(sizes, bias, dtype)
    cls = getattr(nb, cls_key.split("-")[0])
    ours = helpers.add_adapters(base, cls, rank, 2 * rank, **CLASSES[cls_key])
    looks_trained(ours, b_std=0.2, m_spread=0.3)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**configured(ours, rank, 2 * rank)))
    result = set_peft_model_state_dict(theirs, adapter_files.to_peft_state_dict(ours))
    assert not result.unexpected_keys
    return base, ours, theirs


CASES = [
    ((20, 16, 12), 2),
    ((64, 48, 10), 4),
    ((784, 128, 256, 10), 4),
    ((784, 128, 256, 10), 16),  # the head is clipped to rank 10: rank_pattern
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes, rank", CASES)
@pytest.mark.parametrize("cls_key", list(CLASSES))
def test_forward_gradients_merge_match_peft(nb, cls_key, sizes, rank, bias, dtype):
    _, ours, theirs = build(nb, cls_key, sizes, rank, bias, dtype)
    torch.manual_seed(2)
    x = torch.randn(8, sizes[0], dtype=dtype)
    compared = assert_matches_peft(ours, theirs, x, PEFT_TOL[dtype], nb.merge)
    assert compared == (len(sizes) - 1) * (3 if "DoRA" in cls_key else 2)


@pytest.mark.parametrize("kind", ["LinearWithLoRA", "LinearWithDoRA"])
def test_adapter_round_trip_through_peft(nb, kind):
    """ours -> PEFT keys -> PEFT model -> PEFT's own state dict -> ours: same outputs."""
    base, ours, theirs = build(nb, kind, (784, 128, 256, 10), 16, True, torch.float64)
    x = torch.randn(5, 784, dtype=torch.float64)
    peft_sd = get_peft_model_state_dict(theirs)
    assert set(peft_sd) == set(adapter_files.to_peft_state_dict(ours))
    back = adapter_files.from_peft_state_dict(peft_sd, theirs.peft_config["default"])
    fresh = helpers.add_adapters(base, getattr(nb, kind), 16, 32)
    helpers.load_adapter(fresh, back)
    assert torch.equal(fresh(x), ours(x))
    # a live PEFT state_dict (adapter name in the keys, base weights included) works too
    back_live = adapter_files.from_peft_state_dict(
        theirs.state_dict(), theirs.peft_config["default"]
    )
    assert set(back_live["tensors"]) == set(back["tensors"])


def test_adapter_trained_in_peft_loads_into_ours(nb):
    """A PEFT DoRA adapter with other values than ours -> from_peft_state_dict -> same function."""
    base = mlp((30, 20, 6), True, torch.float64)
    config = LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["1", "3"])
    theirs = peft_with_values_of_its_own(base, config)
    ours = helpers.add_adapters(base, nb.DoRALinear, 3, 5)
    helpers.load_adapter(
        ours, adapter_files.from_peft_state_dict(get_peft_model_state_dict(theirs), config)
    )
    x = torch.randn(4, 30, dtype=torch.float64)
    assert rel(ours(x), theirs(x)) < 1e-12
    wrong = helpers.add_adapters(base, nb.LinearWithDoRA, 3, 8)  # other alpha
    with pytest.raises(ValueError, match="alpha"):
        helpers.load_adapter(
            wrong, adapter_files.from_peft_state_dict(get_peft_model_state_dict(theirs), config)
        )


# ----------------------------------------------------------------------------- dropout

DROPOUT = 0.3


DROPOUT_CLASSES = {  # Part III's layers: Part I's have no dropout
    "LoRALinear": {},
    "DoRALinear-factored": {"factored_norm": True},
    "DoRALinear-dense": {"factored_norm": False},
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cls_key", list(DROPOUT_CLASSES))
def test_dropout_matches_peft_in_training_and_eval(nb, cls_key, bias):
    """Same random state before both forwards: the same mask, the same outputs and gradients;
    in eval mode no mask, and the function of the layers without dropout."""
    base = mlp((40, 24, 12), bias, torch.float64)
    cls = getattr(nb, cls_key.split("-")[0])
    ours = helpers.add_adapters(base, cls, 4, 8, dropout=DROPOUT, **DROPOUT_CLASSES[cls_key])
    looks_trained(ours, b_std=0.2, m_spread=0.3)
    config = LoraConfig(**configured(ours, 4, 8, DROPOUT))
    assert config.lora_dropout == DROPOUT
    theirs = get_peft_model(copy.deepcopy(base), config)
    set_peft_model_state_dict(theirs, adapter_files.to_peft_state_dict(ours))
    ours.train()
    theirs.train()
    x = torch.randn(16, 40, dtype=torch.float64)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    assert rel(y_ours, y_theirs) <= 1e-12
    torch.manual_seed(8)
    assert rel(ours(x), y_ours) > 1e-3  # another mask, another output: dropout is on
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            layer, _, ours_name = name.partition(".")
            q = theirs.get_parameter(f"base_model.model.{layer}.{OURS_TO_PEFT[ours_name]}")
            assert rel(p.grad, q.grad) <= 1e-12, name
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        y_eval = ours(x)
        assert rel(y_eval, theirs(x)) <= 1e-12
        assert rel(y_eval, helpers.merge_adapters(ours, nb.merge)(x)) <= 1e-12
