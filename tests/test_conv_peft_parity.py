"""The notebook's convolution adapters (section 13) against Hugging Face PEFT's LoRA / DoRA on
nn.Conv2d, and what PEFT does differently.

Where PEFT supports a convolution (groups = 1, no dilation) the same model is wrapped both ways,
parameters are copied across with ``adapter_files.to_peft_state_dict``, and compared: the forward
output, the gradients of A, B and m after one backward pass, and the merged weights, in float64
(relative 1e-10) and float32 (1e-5). Kernel sizes 1 and 3, stride 1 and 2, padding 0 and 1, bias
on and off, convolutions next to linear layers.

PEFT 0.21.2 builds A with all input channels whatever ``groups`` (and B grouped), and does not
pass the dilation to A. So with groups > 1 its update is not a grouped kernel: it refuses to
merge, and its DoRA norm is not the norm of the kernel it applies; a dilated 3x3 convolution
fails. There our layers are tested against the formula (tests/test_conv.py), and the tests at the
end of this file record what PEFT does, with the LoRA part compared where it can be: PEFT's A
restricted to our block structure.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from support import (
    PEFT_TOL,
    assert_matches_peft,
    configured,
    looks_trained,
    peft_with_values_of_its_own,
    rel,
    wrappers,
)

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install peft")
LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
set_peft_model_state_dict = peft.set_peft_model_state_dict

# convolutions (in, out, kernel, stride, padding), each followed by tanh; then a linear head
CASES = {
    "k3-s1-p1": [(3, 6, 3, 1, 1)],
    "k1": [(3, 6, 1, 1, 0)],
    "k3-s2-p1": [(3, 6, 3, 2, 1)],
    "k3-s2-p0, k1": [(4, 8, 3, 2, 0), (8, 5, 1, 1, 0)],
    "k1-s2, k3-s1-p1": [(2, 6, 1, 2, 0), (6, 6, 3, 1, 1)],
}
PEFT_0212 = pytest.mark.skipif(
    peft.__version__ != "0.21.2", reason="records PEFT 0.21.2's behaviour (the notebook cites it)"
)


def cnn(convs, bias, dtype):
    torch.manual_seed(0)
    layers = []
    for n_in, n_out, kernel, stride, padding in convs:
        layers += [nn.Conv2d(n_in, n_out, kernel, stride, padding, bias=bias), nn.Tanh()]
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * convs[-1][1], 5, bias=bias)]
    return nn.Sequential(*layers).to(dtype)


def build(nb, kind, convs, bias, dtype, rank=2):
    base = cnn(convs, bias, dtype)
    ours = looks_trained(
        helpers.add_adapters(base, wrappers(nb, kind), rank, 2 * rank), b_std=0.2, m_spread=0.3
    )
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**configured(ours, rank, 2 * rank)))
    result = set_peft_model_state_dict(theirs, adapter_files.to_peft_state_dict(ours))
    assert not result.unexpected_keys
    return base, ours, theirs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_forward_gradients_merge_match_peft(nb, kind, case, bias, dtype):
    _, ours, theirs = build(nb, kind, CASES[case], bias, dtype)
    torch.manual_seed(2)
    x = torch.randn(4, CASES[case][0][0], 9, 9, dtype=dtype)
    merges = {
        getattr(nb, f"LinearWith{kind}"): nb.merge,
        getattr(nb, f"Conv2dWith{kind}"): nb.merge_conv,
    }
    compared = assert_matches_peft(ours, theirs, x, PEFT_TOL[dtype], merges)
    assert compared == (len(CASES[case]) + 1) * (3 if kind == "DoRA" else 2)


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_adapter_trained_in_peft_loads_into_ours(nb, kind):
    """A PEFT adapter on convolutions and a linear layer, with its own values -> ours."""
    base = cnn(CASES["k3-s2-p0, k1"], True, torch.float64)
    config = LoraConfig(r=2, lora_alpha=3, use_dora=kind == "DoRA", target_modules=["0", "2", "6"])
    theirs = peft_with_values_of_its_own(base, config)
    ours = helpers.add_adapters(base, wrappers(nb, kind), 2, 3)
    state = peft.get_peft_model_state_dict(theirs)
    helpers.load_adapter(ours, adapter_files.from_peft_state_dict(state, config))
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    assert rel(ours(x), theirs(x)) < 1e-12


# ---------------------------------------------------------------- where PEFT does otherwise


def grouped(nb, kind, dtype=torch.float64):
    """A grouped convolution (4 -> 6 channels, 2 groups) wrapped by us and by PEFT, rank 4, with
    PEFT's A (4, 4, 3, 3) set to ours (4, 2, 3, 3) on the blocks each group sees, zero elsewhere:
    then both compute the same LoRA update, and only the block structure differs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(dtype)
    ours = looks_trained(
        getattr(nb, f"Conv2dWith{kind}")(copy.deepcopy(conv), 4, 8), b_std=0.2, m_spread=0.3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "groups > 1 ... Merging is not supported"
        config = LoraConfig(r=4, lora_alpha=8, use_dora=kind == "DoRA", target_modules=["0"])
        theirs = get_peft_model(nn.Sequential(copy.deepcopy(conv)), config)
    layer = theirs.base_model.model[0]
    if layer.lora_B["default"].weight.shape != ours.lora.B.shape:
        pytest.skip(
            f"PEFT {peft.__version__} has no grouped LoRA for Conv2d (its B is "
            f"{tuple(layer.lora_B['default'].weight.shape)}, ours {tuple(ours.lora.B.shape)}); "
            "ours is tested against the formula in tests/test_conv.py"
        )
    A = layer.lora_A["default"].weight
    assert A.shape == (4, 4, 3, 3)  # all 4 input channels, not 4 / groups
    with torch.no_grad():
        A.zero_()
        for j in range(2):
            A[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] = ours.lora.A[2 * j : 2 * j + 2]
        layer.lora_B["default"].weight.copy_(ours.lora.B)
        if kind == "DoRA":
            layer.lora_magnitude_vector["default"].weight.copy_(ours.m.reshape(1, -1, 1, 1))
    return ours, theirs, layer


def test_grouped_lora_equals_peft_on_our_block_structure(nb):
    ours, theirs, layer = grouped(nb, "LoRA")
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    y_ours, y_theirs = ours(x), theirs(x)
    assert rel(y_ours, y_theirs) <= 1e-10
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_theirs * target).sum().backward()
    assert rel(ours.lora.B.grad, layer.lora_B["default"].weight.grad) <= 1e-10
    grad_A = layer.lora_A["default"].weight.grad
    for j in range(2):
        block = grad_A[2 * j : 2 * j + 2, 2 * j : 2 * j + 2]
        assert rel(ours.lora.A.grad[2 * j : 2 * j + 2], block) <= 1e-10


@PEFT_0212
def test_peft_grouped_update_is_not_a_grouped_kernel_and_does_not_merge(nb):
    """PEFT's A gets gradients across groups: trained, its update connects every input channel
    to every output and no grouped nn.Conv2d holds it. PEFT refuses to merge; ours merges."""
    ours, theirs, layer = grouped(nb, "LoRA")
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    theirs(x).square().sum().backward()
    grad_A = layer.lora_A["default"].weight.grad
    assert grad_A[0:2, 2:4].abs().max() > 1e-3  # group 0's rank channels, group 1's inputs
    with pytest.raises(NotImplementedError, match="groups"):
        copy.deepcopy(theirs).merge_and_unload()
    merged = nb.merge_conv(ours)
    assert merged.groups == 2 and rel(merged(x), ours(x)) <= 1e-12


@PEFT_0212
def test_peft_grouped_dora_normalises_another_weight(nb):
    """Same kernels, same m: equal at initialisation (B = 0), different once B moved, because
    PEFT reshapes an (out/groups, in * kh * kw) product into the kernel's shape for the norm. Ours
    follows the formula (tests/test_conv.py::test_dora_matches_formula)."""
    ours, theirs, layer = grouped(nb, "DoRA")
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        B, saved = layer.lora_B["default"].weight, ours.lora.B.clone()
        B.zero_()
        ours.lora.B.zero_()
        assert rel(ours(x), theirs(x)) <= 1e-10
        B.copy_(saved)
        ours.lora.B.copy_(saved)
        assert rel(ours(x), theirs(x)) > 1e-3


@PEFT_0212
def test_peft_does_not_pass_the_dilation_to_A(nb):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2).double()
    config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["0"])
    theirs = get_peft_model(nn.Sequential(copy.deepcopy(conv)), config)
    assert theirs.base_model.model[0].lora_A["default"].dilation == (1, 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="size"):
        theirs(x)
    ours = nb.Conv2dWithDoRA(conv, 2, 4)
    assert ours.lora.dilation == (2, 2) and ours(x).shape == conv(x).shape
