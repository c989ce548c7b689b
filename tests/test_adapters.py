"""Merging adapters, our adapter files (round trip, atomic save, every refusal), PEFT's names,
and the memory probe."""

import copy

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from dora_tutorial.adapter_files import adapter_state_dict
from support import load_error, looks_trained

CLASSES = ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"]
SIZES = (40, 32, 24, 10)
X = torch.randn(16, SIZES[0], generator=torch.Generator().manual_seed(0))


def wrapped(nb, cls="LinearWithDoRA", rank=4, alpha=8, sizes=SIZES):
    """The MLP wrapped with cls (cls=None: not wrapped)."""
    mlp = helpers.make_mlp(sizes, seed=0)
    return mlp if cls is None else helpers.add_adapters(mlp, getattr(nb, cls), rank, alpha)


def trained(nb, cls="LinearWithDoRA", rank=4, alpha=8, seed=0):
    """A wrapped MLP whose adapters look trained (B != 0, m != ||W0||)."""
    return looks_trained(wrapped(nb, cls, rank, alpha), seed, b_std=0.1, m_spread=0.2)


@pytest.mark.parametrize("cls", CLASSES)
def test_merge(nb, cls):
    model = trained(nb, cls)
    before = copy.deepcopy(model.state_dict())
    merged = helpers.merge_adapters(model, nb.merge)
    assert [type(m) for m in merged] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(merged(X), model(X), rtol=1e-5, atol=1e-5)
    for name, w in helpers.layer_weights(model).items():
        assert torch.equal(merged.get_submodule(name).weight, w)
    assert not torch.allclose(merged[0].weight, model[0].linear.weight, atol=1e-4)  # B counted
    assert torch.equal(merged[0].bias, model[0].linear.bias)  # the bias not rescaled
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    layer = nb.LinearWithDoRA(nn.Linear(12, 6, bias=False), 2, 4)
    assert nb.merge(looks_trained(layer)).bias is None


def test_merge_adapters_nested_names(nb):
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 6), nn.Tanh()), nn.Linear(6, 2))
    wrapped_model = helpers.add_adapters(model, nb.LinearWithDoRA, 2, 4)
    assert set(helpers.adapter_layers(wrapped_model)) == {"0.0", "1"}
    merged = helpers.merge_adapters(wrapped_model, nb.merge)
    assert type(merged[0][0]) is nn.Linear and type(merged[1]) is nn.Linear


@pytest.mark.parametrize("cls", CLASSES)
def test_save_load_round_trip(nb, cls, tmp_path):
    model = trained(nb, cls)
    path = helpers.save_adapter(model, tmp_path / "adapter.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]  # no temp file left behind
    data = torch.load(path, weights_only=True)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in data["tensors"].values()) == n_adapter  # the adapter alone
    assert data["layers"]["0"]["rank"] == 4 and data["layers"]["0"]["alpha"] == 8.0
    fresh = wrapped(nb, cls)
    assert not torch.equal(fresh(X), model(X))
    assert torch.equal(helpers.load_adapter(fresh, path)(X), model(X))
    if cls == "LinearWithDoRA":  # the textbook and the efficient layer read each other's files
        fast = helpers.load_adapter(wrapped(nb, "DoRALinear"), path)
        torch.testing.assert_close(fast(X), model(X), rtol=1e-5, atol=1e-5)


def test_a_failed_save_keeps_the_old_file(nb, tmp_path, monkeypatch):
    model = trained(nb)
    path = helpers.save_adapter(model, tmp_path / "adapter.pt")
    good = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="full"):
        helpers.save_adapter(model, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]


def _edited(key, value):
    """The adapter dict with tensor key dropped (None), one entry set (a float), or replaced."""

    def edit(adapter, tmp_path=None):
        tensors = adapter["tensors"]
        if value is None:
            del tensors[key]
        elif isinstance(value, float):
            tensors[key][3, 1] = value
        else:
            tensors[key] = value
        return adapter

    return edit


def _file(content):
    def write(adapter, tmp_path):
        path = tmp_path / "adapter.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content(adapter), path)
        return path

    return write


NAN = float("nan")
# id: (the model the file is loaded into: wrapped(nb, **these); the source made from a trained
#      DoRA MLP's adapter dict; what the error says)
LOAD_ERRORS = {
    "other rank": ({"rank": 8}, None, ["layer '0': the file has rank 4", "rank=4"]),
    "other alpha": ({"alpha": 16}, None, ["wrap with alpha=8"]),
    "LoRA model": ({"cls": "LinearWithLoRA"}, None, ["DORA adapter", "LinearWithLoRA"]),
    "missing tensor": ({}, _edited("2.m", None), ["missing tensors '2.m'"]),
    "wrong shape": ({}, _edited("0.lora.A", torch.zeros(4, 9)), ["'0.lora.A'", "(4, 9)"]),
    "other layers": ({"sizes": (40, 32, 10)}, None, ["other layers", "'4'"]),
    "other sizes": ({"sizes": (40, 16, 24, 10)}, None, ["shape"]),
    "nan": ({}, _edited("2.lora.B", NAN), ["tensor '2.lora.B' holds 1 NaN or inf value(s)"]),
    "nan in a file": ({}, _file(_edited("2.lora.B", NAN)), ["'2.lora.B' holds 1 NaN"]),
    "a model's state dict": ({}, _file(lambda a: nn.Linear(2, 2).state_dict()), ["not an adapter"]),
    "text file": ({}, _file(b"not a checkpoint\n"), ["is not an adapter file", "save_adapter("]),
    "broken pickle": ({}, _file(b"\x80\x04\x95garbage"), ["is not an adapter file"]),
    "empty file": ({}, _file(b""), ["is not an adapter file"]),
    "pickled code": ({}, _file(lambda a: {**a, "layers": copy.copy}), ["not an adapter file"]),
    "a directory": ({}, lambda a, tmp_path: tmp_path, ["use load_peft_adapter"]),
    "no adapters in the model": ({"cls": None}, None, ["no adapter layers: wrap it first"]),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_refuses_what_does_not_fit_and_leaves_the_model_untouched(nb, tmp_path, case):
    """Never torch's weights_only message, which advises weights_only=False (unsafe)."""
    target, make_source, says = LOAD_ERRORS[case]
    adapter = adapter_state_dict(trained(nb))
    source = make_source(adapter, tmp_path) if make_source else adapter
    message = load_error(wrapped(nb, **target), source)
    assert all(s in message for s in says) and "weights_only" not in message, message


def test_to_and_from_peft_keys(nb):
    model = trained(nb, rank=16)  # the 10-unit head is clipped to rank 10
    peft_sd = adapter_files.to_peft_state_dict(model)
    names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    assert set(peft_sd) == {f"base_model.model.{i}.{k}" for i in "024" for k in names}
    assert torch.equal(peft_sd["base_model.model.2.lora_A.weight"], model[2].lora.A)
    assert torch.equal(peft_sd["base_model.model.2.lora_B.weight"], model[2].lora.B)
    config = adapter_files.peft_config_kwargs(model)
    assert config["r"] == 16 and config["lora_alpha"] == 8.0 and config["use_dora"] is True
    assert config["rank_pattern"] == {"^4": 10} and config["alpha_pattern"] == {}
    back = adapter_files.from_peft_state_dict(peft_sd, config)
    assert back["layers"]["4"]["rank"] == 10 and back["layers"]["0"]["kind"] == "dora"
    mine = adapter_state_dict(model)["tensors"]
    assert set(back["tensors"]) == set(mine)
    assert all(torch.equal(back["tensors"][k], mine[k]) for k in mine)
    with pytest.raises(ValueError, match="use_rslora"):
        adapter_files.from_peft_state_dict(peft_sd, {"lora_alpha": 8, "use_rslora": True})
    with pytest.raises(ValueError, match="unrecognised key"):
        adapter_files.from_peft_state_dict({**peft_sd, "x.something.weight": X}, config)


def test_saved_tensor_bytes_counts_new_live_saved_storages():
    w = nn.Parameter(torch.randn(100, 50))
    x = torch.randn(8, 100)  # an input: saved by matmul but not counted

    def fn():
        h = x @ w  # saves x (input) and nothing new; w's view not counted either
        e = h.exp()  # saves its output e: 8*50 floats, new
        dropped = (h * 3).sin().detach()  # its graph is freed before fn returns
        return (e + dropped).sum()

    assert helpers.saved_tensor_bytes(fn) == 8 * 50 * 4
    assert helpers.saved_tensor_bytes(lambda: (x @ w).sum()) == 0
    with torch.no_grad():
        assert helpers.saved_tensor_bytes(lambda: (x @ w).exp().sum()) == 0
    leaf = torch.randn(64, requires_grad=True)  # y, new, saved by both products: counted once
    assert helpers.saved_tensor_bytes(lambda: ((y := leaf * 2) * y).sum() + y.sin().sum()) == 256
