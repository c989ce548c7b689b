"""The notebook's linear and convolution layers against Hugging Face PEFT, the same model wrapped
both ways and its adapter values copied across (``adapter_files.to_peft_state_dict``)."""

import copy
import re
from functools import partial

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from support import LINEAR, looks_trained, make_layer, merges, rel, wrappers

try:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
except Exception as error:  # via transformers, anything on a torch it does not support
    reason = f"peft cannot be imported: {type(error).__name__}: {error}"
    pytest.skip(reason.splitlines()[0], allow_module_level=True)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
OURS_TO_PEFT = {
    "lora.A": "lora_A.default.weight",
    "lora.B": "lora_B.default.weight",
    "m": "lora_magnitude_vector.default.weight",
}


def mlp(sizes, bias, dtype=torch.float64):
    torch.manual_seed(0)
    pairs = zip(sizes[:-1], sizes[1:], strict=True)
    layers = [m for a, b in pairs for m in (nn.Linear(a, b, bias=bias), nn.Tanh())]
    return nn.Sequential(nn.Flatten(), *layers[:-1]).to(dtype)


def cnn(convs, bias, dtype=torch.float64):
    """Convolutions (in, out, kernel, stride, padding), each followed by tanh; a linear head."""
    torch.manual_seed(0)
    layers = []
    for n_in, n_out, kernel, stride, padding in convs:
        layers += [nn.Conv2d(n_in, n_out, kernel, stride, padding, bias=bias), nn.Tanh()]
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * convs[-1][1], 5, bias=bias)]
    return nn.Sequential(*layers).to(dtype)


def configured(model, rank, alpha, dropout=0.0):
    """LoraConfig from the rank and alpha the layers were asked for, not from what they record
    (a layer scaling by alpha instead of alpha / r would hand PEFT the same mistake). A layer
    ``add_adapters`` gave a smaller rank (fewer inputs or outputs) goes into ``rank_pattern``."""
    layers = helpers.adapter_layers(model)
    bases = {n: getattr(mod, "linear", None) or mod.conv for n, mod in layers.items()}
    ranks = {n: min(rank, *base.weight.flatten(1).shape) for n, base in bases.items()}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_dora=all(hasattr(mod, "m") for mod in layers.values()),
        lora_dropout=dropout,
        target_modules=list(layers),
        rank_pattern={f"^{re.escape(n)}": r for n, r in ranks.items() if r != rank},
    )


def build(nb, key, base, rank, dropout=None):
    """key: a linear class, DoRALinear-factored / -dense, or LoRA / DoRA (by layer type)."""
    extra = {} if dropout is None else {"dropout": dropout}
    cls = wrappers(nb, key) if key in ("LoRA", "DoRA") else partial(make_layer, nb, key)
    ours = helpers.add_adapters(base, cls, rank, 2 * rank, **extra)
    looks_trained(ours, b_std=0.2, m_spread=0.3)
    theirs = get_peft_model(copy.deepcopy(base), configured(ours, rank, 2 * rank, dropout or 0))
    result = set_peft_model_state_dict(theirs, adapter_files.to_peft_state_dict(ours))
    assert not result.unexpected_keys
    return ours, theirs


def peft_twin(theirs, name):
    layer, _, ours_name = name.partition(".")
    return theirs.get_parameter(f"base_model.model.{layer}.{OURS_TO_PEFT[ours_name]}")


MLPS = [((20, 16, 12), 2), ((64, 48, 10), 4), ((784, 128, 256, 10), 4), ((784, 128, 256, 10), 16)]
CNNS = [  # (in, out, kernel, stride, padding): kernel 1 and 3, stride 1 and 2, padding 0 and 1
    [(3, 6, 3, 1, 1)],
    [(3, 6, 1, 1, 0)],
    [(3, 6, 3, 2, 1)],
    [(4, 8, 3, 2, 0), (8, 5, 1, 1, 0)],
    [(2, 6, 1, 2, 0), (6, 6, 3, 1, 1)],
]
CASES = [(key, mlp, s, rank, (8, s[0])) for key in LINEAR[:1] + LINEAR[2:] for s, rank in MLPS]
CASES += [(kind, cnn, c, 2, (4, c[0][0], 9, 9)) for kind in ("LoRA", "DoRA") for c in CNNS]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("key, model, shape, rank, x_shape", CASES)
def test_forward_gradients_merge_match_peft(nb, key, model, shape, rank, x_shape, bias, dtype):
    ours, theirs = build(nb, key, model(shape, bias, dtype), rank)
    torch.manual_seed(2)
    x = torch.randn(x_shape, dtype=dtype)
    tol = TOL[dtype]
    y_ours, y_theirs = ours(x), theirs(x)
    assert rel(y_ours, y_theirs) <= tol
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_theirs * target).sum().backward()
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == len(helpers.adapter_layers(ours)) * (3 if "DoRA" in key else 2)
    for name, p in trained:
        q = peft_twin(theirs, name)  # PEFT keeps a Conv2d's m as (1, out, 1, 1)
        assert torch.equal(p.detach(), q.detach().reshape(p.shape))
        assert rel(p.grad, q.grad.reshape(p.shape)) <= tol, name
    merged_theirs = copy.deepcopy(theirs).merge_and_unload()
    merged_ours = helpers.merge_adapters(ours, merges(nb))
    for (n1, w1), (n2, w2) in zip(
        merged_ours.state_dict().items(), merged_theirs.state_dict().items(), strict=True
    ):
        assert n1 == n2 and rel(w1, w2) <= tol, n1
    assert rel(merged_ours(x), y_theirs) <= 10 * tol


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("key", ["LoRALinear", "DoRALinear-factored", "DoRALinear-dense"])
def test_dropout_matches_peft_in_training_and_eval(nb, key, bias):
    """Same random state before both forwards: the same mask, outputs and gradients; in eval
    mode no mask, and the function of the merged layers."""
    ours, theirs = build(nb, key, mlp((40, 24, 12), bias), 4, dropout=0.3)
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
            assert rel(p.grad, peft_twin(theirs, name).grad) <= 1e-12, name
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        y_eval = ours(x)
        assert rel(y_eval, theirs(x)) <= 1e-12
        assert rel(y_eval, helpers.merge_adapters(ours, nb.merge)(x)) <= 1e-12
