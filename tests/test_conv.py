"""The notebook's convolution adapters against their definitions, independently written: the
update's kernel entry by entry (output channel o of group j sees the rank channels of group j),
DoRA as F.conv2d with m * V / ||V||, the norm over all axes but the output channel; and the
helpers on models that mix convolutional and linear adapters (their training: test_training)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from dora_tutorial import adapter_files
from support import looks_trained, merges, small_cnn, wrappers

# (in, out, kernel, stride, padding, dilation, groups, bias, rank): kernel sizes 1 and 3, a
# rectangular kernel, stride 2, padding, dilation, groups, depthwise, with and without bias
GEOMETRIES = [
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


@pytest.mark.parametrize("kind", ["LoRA", "DoRA"])
def test_a_cnns_adapters_wrap_merge_weigh_and_save(nb, kind, tmp_path):
    pretrained = small_cnn()
    model = looks_trained(helpers.add_adapters(pretrained, wrappers(nb, kind), rank=4, alpha=8))
    layers = helpers.adapter_layers(model)
    suffixes = ("lora.A", "lora.B", "m") if kind == "DoRA" else ("lora.A", "lora.B")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{s}" for i in ("1", "3", "6", "8") for s in suffixes}
    x = torch.randn(5, 784, dtype=torch.float64)
    merged = helpers.merge_adapters(model, merges(nb))
    assert [type(merged[i]) for i in (1, 3, 6, 8)] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="Conv2dWith.* no merge function"):
        helpers.merge_adapters(model, {getattr(nb, f"LinearWith{kind}"): nb.merge})
    weights = helpers.layer_weights(model)
    assert set(weights) == set(helpers.layer_weights(pretrained)) == set(layers)
    torch.testing.assert_close(weights["3"], model[3].merged_weight().detach())
    clipped = helpers.add_adapters(nn.Sequential(nn.Conv2d(1, 3, 1)), wrappers(nb, kind), 8, 16)
    assert clipped[0].lora.A.shape[0] == 1  # fan-in 1: rank 1
    path = helpers.save_adapter(model, tmp_path / "cnn.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["layers"]["3"] == {
        "class": f"Conv2dWith{kind}", "kind": kind.lower(), "rank": 4, "alpha": 8.0, "dropout": 0.0
    }  # fmt: skip
    assert not any(k.split(".")[1] in ("conv", "linear") for k in saved["tensors"])  # no W0
    fresh = helpers.add_adapters(pretrained, wrappers(nb, kind), 4, 8)
    assert torch.equal(helpers.load_adapter(fresh, path)(x), model(x))
    with pytest.raises(ValueError, match="layer '1': the file has rank 4"):
        helpers.load_adapter(helpers.add_adapters(pretrained, wrappers(nb, kind), 2, 4), path)
    peft_sd = adapter_files.to_peft_state_dict(model)  # PEFT: A the kernel, m (1, out, 1, 1)
    shape = {k.removeprefix("base_model.model.3."): tuple(t.shape) for k, t in peft_sd.items()}
    assert shape["lora_A.weight"] == (4, 4, 3, 3) and shape["lora_B.weight"] == (8, 4, 1, 1)
    assert kind == "LoRA" or shape["lora_magnitude_vector"] == (1, 8, 1, 1)
    back = adapter_files.from_peft_state_dict(peft_sd, adapter_files.peft_config_kwargs(model))
    assert back["layers"]["3"]["class"] == "peft lora.Conv2d"
    assert all(torch.equal(back["tensors"][k], t) for k, t in saved["tensors"].items())
