"""The notebook's convolution adapters (section 13) against their definitions, the helpers that
wrap, merge, save and load models mixing linear and convolutional adapters, and
dora_tutorial/check_dora's verdict on the layers.

The reference here is written independently of the layers: the update's kernel is built entry by
entry from its definition (output channel o of group j sees the rank channels of group j), and
DoRA's output is F.conv2d with m * V / ||V||, the norm over all axes but the output channel.
"""

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from dora_tutorial import adapter_files
from dora_tutorial.adapter_files import adapter_state_dict
from dora_tutorial.check_dora import check_dora
from support import (
    assert_detach_changes_only_direction_gradients,
    looks_trained,
    solo_run,
    tiny_task,
    wrappers,
)

CLASSES = ["Conv2dWithLoRA", "Conv2dWithDoRA"]

# (in, out, kernel, stride, padding, dilation, groups, bias, rank): kernel sizes 1 and 3, a
# rectangular kernel, stride 2, padding, dilation, groups, with and without bias
GEOMETRIES = [
    (3, 8, 3, 1, 1, 1, 1, True, 2),
    (4, 6, 1, 1, 0, 1, 1, False, 3),
    (3, 5, 3, 2, 1, 1, 1, True, 4),
    (2, 4, (3, 1), 2, (1, 0), 1, 1, False, 2),
    (4, 6, 3, 1, 2, 2, 1, True, 2),
    (4, 6, 3, 2, 1, 1, 2, True, 4),
    (6, 6, 3, 1, 2, 2, 3, False, 3),
    (4, 4, 3, 1, 1, 1, 4, True, 4),  # depthwise
]
IDS = [f"in{g[0]}-out{g[1]}-k{g[2]}-s{g[3]}-p{g[4]}-d{g[5]}-g{g[6]}-b{g[7]:d}" for g in GEOMETRIES]


def make_conv(geometry, dtype=torch.float64, seed=0):
    n_in, n_out, kernel, stride, padding, dilation, groups, bias, _ = geometry
    torch.manual_seed(seed)
    conv = nn.Conv2d(n_in, n_out, kernel, stride, padding, dilation, groups, bias=bias)
    return conv.to(dtype)


def reference_delta(A, B, scaling, groups):
    """s * B A as a kernel (out, in/groups, kh, kw), entry by entry from the definition."""
    rank, out = A.shape[0], B.shape[0]
    r_g, out_g = rank // groups, out // groups
    delta = torch.zeros(out, *A.shape[1:], dtype=A.dtype)
    for o in range(out):
        j = o // out_g  # the group of output channel o
        for k in range(r_g):
            delta[o] += B[o, k, 0, 0] * A[j * r_g + k]
    return scaling * delta


def conv_with(conv, x, weight):
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def inputs(conv, seed=2, size=(9, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, conv.in_channels, *size, generator=g, dtype=conv.weight.dtype)


# ----------------------------------------------------------------------------- the layers


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_identity_at_init(nb, geometry):
    conv = make_conv(geometry)
    x, rank = inputs(conv), geometry[-1]
    assert torch.equal(nb.Conv2dWithLoRA(conv, rank, 2 * rank)(x), conv(x))
    dora = nb.Conv2dWithDoRA(conv, rank, 2 * rank)
    torch.testing.assert_close(dora(x), conv(x), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("cls", CLASSES)
def test_init_conventions(nb, cls):
    conv = nn.Conv2d(6, 8, 3, groups=2)
    layer = getattr(nb, cls)(conv, rank=4, alpha=12)
    assert layer.lora.scaling == 3.0  # alpha / rank
    assert layer.lora.A.shape == (4, 3, 3, 3) and layer.lora.B.shape == (8, 2, 1, 1)
    assert not layer.lora.B.any()
    bound = 1 / math.sqrt(3 * 3 * 3)  # kaiming_uniform_(a=sqrt(5)) on fan_in in/groups*kh*kw
    assert bound >= layer.lora.A.abs().max() > 0.8 * bound
    if cls == "Conv2dWithDoRA":
        assert layer.m.shape == (8,) and layer.detach_norm is True  # one per OUTPUT channel
        torch.testing.assert_close(layer.m, conv.weight.detach().flatten(1).norm(dim=1))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_lora_matches_formula(nb, geometry):
    conv, rank = make_conv(geometry), geometry[-1]
    layer = looks_trained(nb.Conv2dWithLoRA(conv, rank, 7))
    A, B, s = layer.lora.A.detach(), layer.lora.B.detach(), layer.lora.scaling
    W = conv.weight.detach() + reference_delta(A, B, s, conv.groups)
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)
    x = inputs(conv)
    torch.testing.assert_close(layer(x), conv_with(conv, x, W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_dora_matches_formula(nb, geometry):
    """y = conv(x; m * V / ||V||) + b, norm per output channel over (in/groups, kh, kw)."""
    conv, rank = make_conv(geometry), geometry[-1]
    layer = looks_trained(nb.Conv2dWithDoRA(conv, rank, 7))
    A, B, m = (t.detach() for t in (layer.lora.A, layer.lora.B, layer.m))
    V = conv.weight.detach() + reference_delta(A, B, layer.lora.scaling, conv.groups)
    norm = V.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
    W = m.reshape(-1, 1, 1, 1) * V / norm
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)
    x = inputs(conv)
    torch.testing.assert_close(layer(x), conv_with(conv, x, W), rtol=1e-12, atol=1e-12)
    norms = layer.merged_weight().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, layer.m.detach(), rtol=1e-12, atol=0)


def test_detach_changes_only_direction_gradients(nb):
    conv = make_conv(GEOMETRIES[2]).requires_grad_(False)
    detached = looks_trained(nb.Conv2dWithDoRA(conv, 4, 8))
    exact = nb.Conv2dWithDoRA(conv, 4, 8, detach_norm=False)
    assert_detach_changes_only_direction_gradients(detached, exact, inputs(conv))


def test_zero_kernel_gives_no_nan(nb):
    """An all-zero output channel: row_norm's floor keeps 0 / 0 out, as for linear rows."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1] = 0
    layer = nb.Conv2dWithDoRA(conv, 2, 4)
    y = layer(torch.randn(2, 3, 6, 6))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(layer.lora.B.grad).all()


def test_low_precision_and_dtype(nb):
    conv = nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    layer = looks_trained(nb.Conv2dWithDoRA(conv, 2, 4))
    x = torch.randn(2, 3, 6, 6)
    y = layer(x)  # float32 input, bfloat16 layer: computes in bfloat16, answers in float32
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert layer.merged_weight().dtype == torch.bfloat16


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "conv, kwargs, error, match",
    [
        (nn.Conv2d(3, 8, 3), dict(rank=0, alpha=8), ValueError, "positive int"),
        (nn.Conv2d(3, 8, 3), dict(rank=2.0, alpha=8), ValueError, "positive int"),
        (nn.Conv2d(3, 8, 3), dict(rank=9, alpha=8), ValueError, "exceeds"),
        (nn.Conv2d(3, 8, 3), dict(rank=2, alpha=0), ValueError, "alpha"),
        (nn.Conv2d(1, 4, 1), dict(rank=2, alpha=8), ValueError, "exceeds"),  # 1 input
        (nn.Conv2d(4, 6, 3, groups=2), dict(rank=3, alpha=8), ValueError, "multiple of groups"),
        (
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
            dict(rank=2, alpha=8),
            ValueError,
            "padding_mode",
        ),
        (nn.Conv1d(3, 8, 3), dict(rank=2, alpha=8), TypeError, "nn.Conv2d"),
        (nn.Linear(3, 8), dict(rank=2, alpha=8), TypeError, "LinearWith"),
    ],
)
def test_invalid_arguments(nb, cls, conv, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(nb, cls)(conv, **kwargs)


def test_grouped_rank_may_exceed_one_groups_kernel(nb):
    """The bound is the whole kernel as a matrix: out x (in * kh * kw), all groups together."""
    conv = nn.Conv2d(8, 8, 3, groups=8)  # depthwise: each group's kernel is 1 x 9
    layer = nb.Conv2dWithDoRA(conv, rank=8, alpha=8)  # rank 1 per group
    assert layer.lora.A.shape == (8, 1, 3, 3) and layer.lora.B.shape == (8, 1, 1, 1)


def test_linear_classes_still_refuse_convolutions(nb):
    with pytest.raises(TypeError, match="nn.Linear"):
        nb.DoRALinear(nn.Conv2d(3, 8, 3), rank=2, alpha=4)


def test_notebook_conv_layer_passes_every_check(nb):
    report = check_dora(nb.Conv2dWithDoRA, kind="conv2d")
    assert report.passed, str(report)
    assert report.name == "Conv2dWithDoRA on nn.Conv2d"
    assert report.adapter == "A = lora.A (3, 11, 3, 3), B = lora.B (7, 3, 1, 1), m = m (7,)"
    exact = check_dora(functools.partial(nb.Conv2dWithDoRA, detach_norm=False), kind="conv2d")
    assert set(exact.failed) == {6}, str(exact)


def test_conv_lora_and_a_linear_layer_are_not_taken_for_conv_dora(nb):
    lora = check_dora(nb.Conv2dWithLoRA, kind="conv2d")
    assert not lora.identified and "this looks like LoRA, not DoRA" in lora.problem
    linear = check_dora(nb.DoRALinear, kind="conv2d")  # refuses the nn.Conv2d
    assert not linear.identified and "must take (conv2d, rank, alpha)" in linear.problem


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_merge_conv(nb, cls, geometry):
    conv, rank = make_conv(geometry), geometry[-1]
    layer = looks_trained(getattr(nb, cls)(conv, rank, 2 * rank))
    merged = nb.merge_conv(layer)
    assert type(merged) is nn.Conv2d and merged.weight.requires_grad
    for attr in ("stride", "padding", "dilation", "groups", "kernel_size", "padding_mode"):
        assert getattr(merged, attr) == getattr(conv, attr), attr
    assert (merged.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(merged.bias, conv.bias)  # the bias is not rescaled
    x = inputs(conv)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- whole models


def small_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    ).to(dtype)


def trained_cnn(nb, kind="DoRA", rank=4, alpha=8, dtype=torch.float64):
    pretrained = small_cnn(dtype=dtype)
    model = helpers.add_adapters(pretrained, wrappers(nb, kind), rank, alpha)
    for layer in helpers.adapter_layers(model).values():
        looks_trained(layer)
    return pretrained, model


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_add_adapters_with_a_class_per_layer_type(nb, kind):
    model = helpers.add_adapters(small_cnn(), wrappers(nb, kind), rank=4, alpha=8)
    layers = helpers.adapter_layers(model)
    assert {n: type(m).__name__ for n, m in layers.items()} == {
        "1": f"Conv2dWith{kind}",
        "3": f"Conv2dWith{kind}",
        "6": f"LinearWith{kind}",
        "8": f"LinearWith{kind}",
    }
    suffixes = ("lora.A", "lora.B", "m") if kind == "DoRA" else ("lora.A", "lora.B")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{s}" for i in layers for s in suffixes}
    model(torch.randn(2, 784)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_add_adapters_with_one_class_wraps_linear_layers_only(nb):
    model = helpers.add_adapters(small_cnn(), nb.LinearWithDoRA, rank=4, alpha=8)
    assert set(helpers.adapter_layers(model)) == {"6", "8"}
    assert type(model[1]) is nn.Conv2d and not model[1].weight.requires_grad
    with pytest.raises(ValueError, match="no nn.Conv2d layers"):
        helpers.add_adapters(nn.Sequential(nn.Linear(3, 4)), {nn.Conv2d: nb.Conv2dWithDoRA}, 2, 4)


def test_add_adapters_clips_the_rank_of_small_kernels(nb):
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 16, 3))  # fan-in 1 and 27
    wrapped = helpers.add_adapters(model, {nn.Conv2d: nb.Conv2dWithDoRA}, rank=8, alpha=16)
    assert wrapped[0].lora.A.shape[0] == 1 and wrapped[1].lora.A.shape[0] == 8


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_merge_adapters_with_a_function_per_adapter_class(nb, kind):
    _, model = trained_cnn(nb, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merges = {
        getattr(nb, f"LinearWith{kind}"): nb.merge,
        getattr(nb, f"Conv2dWith{kind}"): nb.merge_conv,
    }
    merged = helpers.merge_adapters(model, merges)
    assert [type(merged[i]) for i in (1, 3, 6, 8)] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    assert not helpers.adapter_layers(merged)
    x = torch.randn(5, 784, dtype=torch.float64)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    with pytest.raises(TypeError, match="Conv2dWith.* no merge function"):
        helpers.merge_adapters(model, {getattr(nb, f"LinearWith{kind}"): nb.merge})


def test_layer_weights_of_a_cnn(nb):
    pretrained, model = trained_cnn(nb)
    plain, adapted = helpers.layer_weights(pretrained), helpers.layer_weights(model)
    assert set(plain) == set(adapted) == {"1", "3", "6", "8"}
    assert plain["1"].shape == adapted["1"].shape == (4, 1, 3, 3)
    torch.testing.assert_close(adapted["3"], model[3].merged_weight().detach())


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_save_load_round_trip_of_a_cnn(nb, kind, tmp_path):
    pretrained, model = trained_cnn(nb, kind)
    path = helpers.save_adapter(model, tmp_path / "cnn.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["layers"]["3"] == {
        "class": f"Conv2dWith{kind}",
        "kind": kind.lower(),
        "rank": 4,
        "alpha": 8.0,
        "in_channels": 4,
        "out_channels": 8,
        "kernel_size": [3, 3],
        "groups": 1,
        "dropout": 0.0,
    }
    assert saved["layers"]["6"]["in_features"] == 392
    assert not any(k.split(".")[1] in ("conv", "linear") for k in saved["tensors"])
    fresh = helpers.add_adapters(pretrained, wrappers(nb, kind), 4, 8)
    helpers.load_adapter(fresh, path)
    x = torch.randn(3, 784, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    wrong = helpers.add_adapters(pretrained, wrappers(nb, kind), 2, 4)
    with pytest.raises(ValueError, match="layer '1': the file has rank 4"):
        helpers.load_adapter(wrong, path)


def test_grouped_conv_adapter_file_records_the_groups(nb):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    wrapped = helpers.add_adapters(model, {nn.Conv2d: nb.Conv2dWithDoRA}, rank=4, alpha=8)
    info = adapter_state_dict(wrapped)["layers"]["0"]
    assert (info["in_channels"], info["out_channels"], info["groups"]) == (4, 6, 2)


def test_peft_keys_of_a_cnn(nb):
    """Without PEFT: the names and shapes PEFT uses, and back (a Conv2d's m is (1, out, 1, 1))."""
    _, model = trained_cnn(nb)
    peft_sd = adapter_files.to_peft_state_dict(model)
    assert peft_sd["base_model.model.3.lora_A.weight"].shape == (4, 4, 3, 3)
    assert peft_sd["base_model.model.3.lora_B.weight"].shape == (8, 4, 1, 1)
    assert peft_sd["base_model.model.3.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    assert peft_sd["base_model.model.6.lora_magnitude_vector"].shape == (16,)
    config = adapter_files.peft_config_kwargs(model)
    assert config["target_modules"] == "1|3|6|8" and config["use_dora"] is True
    back = adapter_files.from_peft_state_dict(peft_sd, config)
    assert back["layers"]["3"]["class"] == "peft lora.Conv2d"
    assert back["layers"]["6"]["class"] == "peft lora.Linear"
    mine = adapter_state_dict(model)
    assert set(back["tensors"]) == set(mine["tensors"])
    assert all(torch.equal(back["tensors"][k], mine["tensors"][k]) for k in mine["tensors"])


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", [None, "LoRA", "DoRA"], ids=["full", "lora", "dora"])
def test_each_batched_seed_of_a_cnn_equals_its_solo_run(nb, kind):
    """Convolution adapters under torch.func.vmap (helpers.train): seed k as if trained alone."""
    pretrained, task, seeds = small_cnn(), tiny_task(n=128), (0, 1)
    wrapper = kind and wrappers(nb, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runs = helpers.finetune(
            pretrained,
            task,
            seeds=seeds,
            wrapper=wrapper,
            epochs=2,
            lr=3e-3,
            batch_size=32,
            log=None,
        )
    for k, seed in enumerate(seeds):
        helpers.seed_everything(seed)
        if wrapper is None:
            solo = copy.deepcopy(pretrained).requires_grad_(True)
        else:
            solo = helpers.add_adapters(pretrained, wrapper, 4, 8)
        solo = solo_run(solo, task, seed, 2, 3e-3, 32)
        for name, p in solo.named_parameters():
            q = runs.models[k].get_parameter(name)
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"seed {seed}: {name}")
