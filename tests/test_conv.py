"""The notebook's convolution adapters against their definitions, independently written: the
update's kernel entry by entry (output channel o of group j sees the rank channels of group j),
DoRA as F.conv2d with m * V / ||V||, the norm over all axes but the output channel; and the
helpers on models that mix convolutional and linear adapters."""

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from dora_tutorial import adapter_files
from dora_tutorial.check_dora import check_dora
from support import looks_trained, merges, solo_run, tiny_task, wrappers

# (in, out, kernel, stride, padding, dilation, groups, bias, rank): kernel sizes 1 and 3, a
# rectangular kernel, stride 2, padding, dilation, groups, depthwise, with and without bias
GEOMETRIES = [
    (3, 8, 3, 1, 1, 1, 1, True, 2),
    (4, 6, 1, 1, 0, 1, 1, False, 3),
    (3, 5, 3, 2, 1, 1, 1, True, 4),
    (2, 4, (3, 1), 2, (1, 0), 1, 1, False, 2),
    (4, 6, 3, 1, 2, 2, 1, True, 2),
    (4, 6, 3, 2, 1, 1, 2, True, 4),
    (6, 6, 3, 1, 2, 2, 3, False, 3),
    (4, 4, 3, 1, 1, 1, 4, True, 4),
]


def reference_delta(A, B, scaling, groups):
    """s * B A as a kernel (out, in/groups, kh, kw), entry by entry from the definition."""
    rank, out = A.shape[0], B.shape[0]
    r_g, out_g = rank // groups, out // groups
    delta = torch.zeros(out, *A.shape[1:], dtype=A.dtype)
    for o in range(out):
        for k in range(r_g):
            delta[o] += B[o, k, 0, 0] * A[(o // out_g) * r_g + k]
    return scaling * delta


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_matches_formula_and_merges(nb, kind, geometry):
    *shape, bias, rank = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(*shape, bias=bias).double()
    x = torch.randn(3, conv.in_channels, 9, 7, generator=torch.Generator().manual_seed(2)).double()
    layer = getattr(nb, f"Conv2dWith{kind}")(conv, rank, 7)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-13, atol=1e-13)  # identity at init
    looks_trained(layer)
    A, B = layer.lora.A.detach(), layer.lora.B.detach()
    W = V = conv.weight.detach() + reference_delta(A, B, 7 / rank, conv.groups)
    if kind == "DoRA":
        norm = V.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
        W = layer.m.detach().reshape(-1, 1, 1, 1) * V / norm
    y = F.conv2d(x, W, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    merged = nb.merge_conv(layer)
    assert type(merged) is nn.Conv2d and merged.weight.requires_grad
    for attr in ("stride", "padding", "dilation", "groups", "kernel_size", "padding_mode"):
        assert getattr(merged, attr) == getattr(conv, attr), attr
    assert (merged.bias is None) == (conv.bias is None)
    assert conv.bias is None or torch.equal(merged.bias, conv.bias)  # the bias is not rescaled
    torch.testing.assert_close(merged(x), y, rtol=1e-12, atol=1e-12)


def test_the_checker_passes_conv_dora_and_tells_lora_and_exact_norms_apart(nb):
    report = check_dora(nb.Conv2dWithDoRA, kind="conv2d")
    assert report.passed and report.name == "Conv2dWithDoRA on nn.Conv2d", str(report)
    exact = check_dora(functools.partial(nb.Conv2dWithDoRA, detach_norm=False), kind="conv2d")
    assert set(exact.failed) == {6}, str(exact)
    lora = check_dora(nb.Conv2dWithLoRA, kind="conv2d")
    assert not lora.identified and "this looks like LoRA, not DoRA" in lora.problem
    linear = check_dora(nb.DoRALinear, kind="conv2d")  # refuses the nn.Conv2d
    assert not linear.identified and "must take (conv2d, rank, alpha)" in linear.problem


def small_cnn(dtype=torch.float64):
    torch.manual_seed(0)
    convs = [nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU()]
    head = [nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10)]
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), *convs, *head).to(dtype)


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_add_merge_and_weights_of_a_cnn(nb, kind):
    pretrained = small_cnn()
    model = looks_trained(helpers.add_adapters(pretrained, wrappers(nb, kind), rank=4, alpha=8))
    layers = helpers.adapter_layers(model)
    names = [type(layers[n]).__name__ for n in ("1", "3", "6", "8")]
    assert names == [f"Conv2dWith{kind}"] * 2 + [f"LinearWith{kind}"] * 2 and len(layers) == 4
    suffixes = ("lora.A", "lora.B", "m") if kind == "DoRA" else ("lora.A", "lora.B")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{s}" for i in layers for s in suffixes}
    x = torch.randn(5, 784, dtype=torch.float64)
    merged = helpers.merge_adapters(model, merges(nb))
    assert [type(merged[i]) for i in (1, 3, 6, 8)] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="Conv2dWith.* no merge function"):
        helpers.merge_adapters(model, {getattr(nb, f"LinearWith{kind}"): nb.merge})
    weights = helpers.layer_weights(model)
    assert set(weights) == set(helpers.layer_weights(pretrained)) == {"1", "3", "6", "8"}
    torch.testing.assert_close(weights["3"], model[3].merged_weight().detach())
    only_linear = helpers.add_adapters(pretrained, nb.LinearWithDoRA, rank=4, alpha=8)
    assert set(helpers.adapter_layers(only_linear)) == {"6", "8"}
    clipped = helpers.add_adapters(nn.Sequential(nn.Conv2d(1, 3, 1)), wrappers(nb, kind), 8, 16)
    assert clipped[0].lora.A.shape[0] == 1  # fan-in 1: rank 1


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_save_load_and_peft_keys_of_a_cnn(nb, kind, tmp_path):
    pretrained = small_cnn()
    model = looks_trained(helpers.add_adapters(pretrained, wrappers(nb, kind), 4, 8))
    path = helpers.save_adapter(model, tmp_path / "cnn.pt")
    saved = torch.load(path, weights_only=True)
    info = saved["layers"]["3"]
    assert info.pop("class") == f"Conv2dWith{kind}" and info.pop("kind") == kind.lower()
    assert info == dict(
        rank=4, alpha=8.0, in_channels=4, out_channels=8, kernel_size=[3, 3], groups=1, dropout=0.0
    )
    assert not any(k.split(".")[1] in ("conv", "linear") for k in saved["tensors"])
    fresh = helpers.add_adapters(pretrained, wrappers(nb, kind), 4, 8)
    helpers.load_adapter(fresh, path)
    x = torch.randn(3, 784, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="layer '1': the file has rank 4"):
        helpers.load_adapter(helpers.add_adapters(pretrained, wrappers(nb, kind), 2, 4), path)
    peft_sd = adapter_files.to_peft_state_dict(model)  # PEFT's names and shapes, and back
    assert peft_sd["base_model.model.3.lora_A.weight"].shape == (4, 4, 3, 3)
    assert peft_sd["base_model.model.3.lora_B.weight"].shape == (8, 4, 1, 1)
    if kind == "DoRA":  # a Conv2d's m is (1, out, 1, 1) there
        assert peft_sd["base_model.model.3.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    back = adapter_files.from_peft_state_dict(peft_sd, adapter_files.peft_config_kwargs(model))
    assert back["layers"]["3"]["class"] == "peft lora.Conv2d"
    mine = adapter_files.adapter_state_dict(model)["tensors"]
    assert back["tensors"].keys() == mine.keys()
    assert all(torch.equal(back["tensors"][k], mine[k]) for k in mine)
    grouped = helpers.add_adapters(
        nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), wrappers(nb, kind), 4, 8
    )
    assert adapter_files.adapter_state_dict(grouped)["layers"]["0"]["groups"] == 2


@pytest.mark.parametrize("kind", [None, "LoRA", "DoRA"], ids=["full", "lora", "dora"])
def test_each_batched_seed_of_a_cnn_equals_its_solo_run(nb, kind):
    """Convolution adapters under torch.func.vmap (helpers.train): seed k as if trained alone."""
    pretrained, task, seeds = small_cnn(torch.float32), tiny_task(n=128), (0, 1)
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
