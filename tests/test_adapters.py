"""Merging, saving and loading adapters, PEFT key conversion, and the memory probe."""

import copy

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from dora_tutorial.adapter_files import adapter_state_dict
from support import load_error

CLASSES = ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"]
SIZES = (784, 128, 256, 10)


def trained(nb, cls="LinearWithDoRA", rank=4, alpha=8, seed=0, sizes=SIZES):
    """A wrapped MLP whose adapters look trained (B != 0, m != ||W0||)."""
    pretrained = helpers.make_mlp(sizes, seed=0)
    model = helpers.add_adapters(pretrained, getattr(nb, cls), rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".m"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    return pretrained, model


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("cls", CLASSES)
def test_merge_layer(nb, cls):
    _, model = trained(nb, cls)
    layer = model[0]
    merged = nb.merge(layer)
    assert type(merged) is nn.Linear
    assert merged.weight.shape == (128, 784) and merged.bias is not None
    x = torch.randn(16, 784)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged.weight, layer.linear.weight, atol=1e-4)  # B != 0 counted
    assert torch.equal(merged.bias, layer.linear.bias)  # bias not rescaled


def test_merge_layer_without_bias(nb):
    torch.manual_seed(0)
    layer = nb.LinearWithDoRA(nn.Linear(12, 6, bias=False), 2, 4)
    with torch.no_grad():
        layer.lora.B.normal_()
    merged = nb.merge(layer)
    assert merged.bias is None
    x = torch.randn(3, 12)
    torch.testing.assert_close(merged(x), layer(x))


@pytest.mark.parametrize("cls", CLASSES)
def test_merge_adapters_model(nb, cls):
    _, model = trained(nb, cls)
    before = copy.deepcopy(model.state_dict())
    merged = helpers.merge_adapters(model, nb.merge)
    assert [type(m) for m in merged] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert not any(hasattr(m, "merged_weight") for m in merged.modules())
    x = torch.randn(32, 784)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    for name, w in helpers.layer_weights(model).items():
        torch.testing.assert_close(merged.get_submodule(name).weight, w, rtol=0, atol=0)
    after = model.state_dict()  # the wrapped model is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_adapters_nested_names(nb):
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 6), nn.Tanh()), nn.Linear(6, 2))
    wrapped = helpers.add_adapters(model, nb.LinearWithDoRA, 2, 4)
    assert set(helpers.adapter_layers(wrapped)) == {"0.0", "1"}
    merged = helpers.merge_adapters(wrapped, nb.merge)
    assert type(merged[0][0]) is nn.Linear and type(merged[1]) is nn.Linear


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip(nb, cls, tmp_path):
    pretrained, model = trained(nb, cls)
    path = helpers.save_adapter(model, tmp_path / "adapter.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]  # no temp file left behind
    data = torch.load(path, weights_only=True)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in data["tensors"].values()) == n_adapter
    assert data["layers"]["0"]["rank"] == 4 and data["layers"]["0"]["alpha"] == 8.0
    fresh = helpers.add_adapters(pretrained, getattr(nb, cls), 4, 8)
    x = torch.randn(20, 784)
    assert not torch.equal(fresh(x), model(x))
    helpers.load_adapter(fresh, path)
    assert torch.equal(fresh(x), model(x))


def test_adapter_file_is_small(nb, tmp_path):
    pretrained, model = trained(nb)
    helpers.save_adapter(model, tmp_path / "a.pt")
    torch.save(pretrained.state_dict(), tmp_path / "full.pt")
    # 6,642 adapter numbers against 136,074 in the MLP: 4.9 %, plus the file's metadata
    assert (tmp_path / "a.pt").stat().st_size < 0.06 * (tmp_path / "full.pt").stat().st_size


def test_textbook_and_efficient_files_interchange(nb):
    pretrained, book = trained(nb, "LinearWithDoRA")
    fast = helpers.add_adapters(pretrained, nb.DoRALinear, 4, 8)
    helpers.load_adapter(fast, adapter_state_dict(book))
    x = torch.randn(5, 784)
    torch.testing.assert_close(fast(x), book(x), rtol=1e-5, atol=1e-5)


def test_save_is_atomic(nb, tmp_path, monkeypatch):
    _, model = trained(nb)
    path = tmp_path / "adapter.pt"
    helpers.save_adapter(model, path)
    good = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        helpers.save_adapter(model, path)
    assert path.read_bytes() == good  # the old file survives a failed save
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]


def test_error_other_rank(nb):
    pretrained, model = trained(nb, rank=4)
    other = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 8, 8)
    message = load_error(other, adapter_state_dict(model))
    assert "rank 4" in message and "rank=4" in message and "'0'" in message


def test_error_other_alpha(nb):
    pretrained, model = trained(nb, alpha=8)
    other = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 16)
    assert "alpha=8" in load_error(other, adapter_state_dict(model))


def test_error_lora_file_into_dora_model(nb):
    pretrained, lora = trained(nb, "LinearWithLoRA")
    dora = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    message = load_error(dora, adapter_state_dict(lora))
    assert "LORA adapter" in message and "LinearWithDoRA" in message


def test_error_missing_tensor(nb):
    pretrained, model = trained(nb)
    adapter = adapter_state_dict(model)
    del adapter["tensors"]["2.m"]
    fresh = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    assert "missing tensors '2.m'" in load_error(fresh, adapter)


def test_error_wrong_shapes(nb):
    pretrained, model = trained(nb)
    adapter = adapter_state_dict(model)
    adapter["tensors"]["0.lora.A"] = torch.zeros(4, 100)
    fresh = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    message = load_error(fresh, adapter)
    assert "'0.lora.A'" in message and "(4, 100)" in message and "(4, 784)" in message


def test_error_other_layers(nb):
    _, model = trained(nb)
    other_pretrained = helpers.make_mlp((784, 128, 10), seed=0)  # layers '0', '2' only
    other = helpers.add_adapters(other_pretrained, nb.LinearWithDoRA, 4, 8)
    message = load_error(other, adapter_state_dict(model))
    assert "'4'" in message and "other layers" in message


def test_error_other_model_sizes(nb):
    _, model = trained(nb)
    other = helpers.add_adapters(helpers.make_mlp((784, 64, 256, 10)), nb.LinearWithDoRA, 4, 8)
    assert "shape" in load_error(other, adapter_state_dict(model))


def test_error_not_an_adapter_file(nb, tmp_path):
    pretrained, model = trained(nb)
    torch.save(pretrained.state_dict(), tmp_path / "full.pt")
    fresh = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    assert "not an adapter" in load_error(fresh, tmp_path / "full.pt")
    assert "no adapter layers" in load_error(pretrained, adapter_state_dict(model))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all\n", b"\x80\x04\x95garbage", b""],
    ids=["text", "broken-pickle", "empty"],
)
def test_garbage_file_gets_this_projects_message(nb, tmp_path, content):
    """Never torch's weights_only message, which advises weights_only=False (unsafe)."""
    pretrained, _ = trained(nb)
    path = tmp_path / "adapter.pt"
    path.write_bytes(content)
    fresh = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    message = load_error(fresh, path)
    assert "is not an adapter file" in message and "save_adapter(model, path)" in message
    assert "weights_only" not in message


def test_pickled_code_is_refused_without_advice_to_run_it(nb, tmp_path):
    pretrained, _ = trained(nb)
    path = tmp_path / "adapter.pt"
    torch.save({"format": "dora-tutorial-adapter/1", "layers": copy.copy}, path)  # a function
    message = load_error(helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8), path)
    assert "is not an adapter file" in message and "weights_only" not in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_it(nb, tmp_path, bad):
    pretrained, model = trained(nb)
    adapter = adapter_state_dict(model)
    adapter["tensors"]["2.lora.B"][3, 1] = bad
    path = tmp_path / "adapter.pt"
    torch.save(adapter, path)
    fresh = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    for source in (adapter, path):
        message = load_error(fresh, source)
        assert "tensor '2.lora.B' holds 1 NaN or inf value(s)" in message


def test_non_finite_peft_tensor_is_refused_naming_it(nb, tmp_path):
    pretrained, model = trained(nb)
    folder = helpers.save_peft_adapter(model, tmp_path / "peft")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.0.lora_magnitude_vector"][0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    fresh = helpers.add_adapters(pretrained, nb.LinearWithDoRA, 4, 8)
    message = load_error(fresh, folder, helpers.load_peft_adapter)
    assert "tensor 'base_model.model.0.lora_magnitude_vector' holds 1 NaN" in message


# ----------------------------------------------------------------------------- PEFT keys


def test_to_and_from_peft_keys(nb):
    _, model = trained(nb, rank=16)  # the 10-class head is clipped to rank 10
    peft_sd = adapter_files.to_peft_state_dict(model)
    assert set(peft_sd) == {
        f"base_model.model.{i}.{k}"
        for i in "024"
        for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    assert torch.equal(peft_sd["base_model.model.2.lora_B.weight"], model[2].lora.B)
    config = adapter_files.peft_config_kwargs(model)
    assert config["r"] == 16 and config["lora_alpha"] == 8.0 and config["use_dora"] is True
    assert config["rank_pattern"] == {"^4": 10} and config["alpha_pattern"] == {}
    back = adapter_files.from_peft_state_dict(peft_sd, config)
    assert back["layers"]["4"]["rank"] == 10 and back["layers"]["0"]["kind"] == "dora"
    mine = adapter_state_dict(model)
    assert set(back["tensors"]) == set(mine["tensors"])
    assert all(torch.equal(back["tensors"][k], mine["tensors"][k]) for k in mine["tensors"])


def test_from_peft_rejects_unknown_keys_and_rslora(nb):
    _, model = trained(nb)
    peft_sd = adapter_files.to_peft_state_dict(model)
    with pytest.raises(ValueError, match="use_rslora"):
        adapter_files.from_peft_state_dict(peft_sd, {"lora_alpha": 8, "use_rslora": True})
    peft_sd["base_model.model.0.something.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unrecognised key"):
        adapter_files.from_peft_state_dict(peft_sd, {"lora_alpha": 8})


# ----------------------------------------------------------------------------- memory probe


def test_saved_tensor_bytes_counts_new_live_saved_storages():
    w = nn.Parameter(torch.randn(100, 50))
    x = torch.randn(8, 100)  # an input: saved by matmul but not counted

    def fn():
        h = x @ w  # saves x (input) and nothing new; w's view not counted either
        e = h.exp()  # saves its output e: 8*50 floats, new
        dropped = (h * 3).sin()  # saves h*3 ...
        dropped = dropped.detach()  # ... but that graph is freed before fn returns
        return (e + dropped).sum()

    assert helpers.saved_tensor_bytes(fn) == 8 * 50 * 4
    assert helpers.saved_tensor_bytes(lambda: (x @ w).sum()) == 0
    with torch.no_grad():
        assert helpers.saved_tensor_bytes(lambda: (x @ w).exp().sum()) == 0


def test_saved_tensor_bytes_counts_a_storage_once():
    x = torch.randn(64, requires_grad=True)

    def fn():
        y = x * 2  # new, saved by both products below
        return (y * y).sum() + (y.sin()).sum()

    assert helpers.saved_tensor_bytes(fn) == 64 * 4
