"""Our adapter files (round trip, atomic save, every refusal), PEFT's names, merging adapters
and the memory probe."""

import copy
import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import adapter_files
from dora_tutorial.adapter_files import adapter_state_dict
from support import load_error, looks_trained

SIZES = (40, 32, 24, 10)
X = torch.randn(16, SIZES[0], generator=torch.Generator().manual_seed(0))


def wrapped(nb, cls="LinearWithDoRA", rank=4, alpha=8, sizes=SIZES):
    """The MLP wrapped with cls (cls=None: not wrapped)."""
    mlp = helpers.make_mlp(sizes, seed=0)
    return mlp if cls is None else helpers.add_adapters(mlp, getattr(nb, cls), rank, alpha)


def trained(nb, cls="LinearWithDoRA", rank=4, alpha=8, seed=0):
    """A wrapped MLP whose adapters look trained (B != 0, m != ||W0||)."""
    return looks_trained(wrapped(nb, cls, rank, alpha), seed, b_std=0.1, m_spread=0.2)


def test_merge_adapters_finds_nested_layers_and_leaves_the_model_untouched(nb):
    inner = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Tanh())
    model = helpers.add_adapters(nn.Sequential(inner, nn.Linear(6, 2)), nb.LinearWithDoRA, 2, 4)
    assert set(helpers.adapter_layers(looks_trained(model))) == {"0.0", "1"}
    before = copy.deepcopy(model.state_dict())
    merged = helpers.merge_adapters(model, nb.merge)
    assert type(merged[0][0]) is nn.Linear and type(merged[1]) is nn.Linear
    assert merged[0][0].bias is None and torch.equal(merged[1].bias, model[1].linear.bias)
    torch.testing.assert_close(merged(X[:, :8]), model(X[:, :8]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


FORMATS = {"ours": (helpers.save_adapter, helpers.load_adapter)}
FORMATS["peft"] = (helpers.save_peft_adapter, helpers.load_peft_adapter)


@pytest.mark.parametrize("save, load", FORMATS.values(), ids=list(FORMATS))
@pytest.mark.parametrize("cls", ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])
def test_save_load_round_trip(nb, cls, save, load, tmp_path):
    model = trained(nb, cls)
    path = save(model, tmp_path / "adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp file left behind
    fresh = wrapped(nb, cls)
    assert not torch.equal(fresh(X), model(X))
    assert torch.equal(load(fresh, path)(X), model(X))
    if cls == "LinearWithDoRA":  # the textbook and the efficient layer read each other's files
        fast = load(wrapped(nb, "DoRALinear"), path)
        torch.testing.assert_close(fast(X), model(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save", [FORMATS[f][0] for f in FORMATS], ids=list(FORMATS))
def test_a_failed_save_changes_no_file(nb, tmp_path, monkeypatch, save):
    save(trained(nb), tmp_path / "old")

    def files():
        return {p: p.read_bytes() if p.is_file() else "dir" for p in tmp_path.rglob("*")}

    before = files()
    monkeypatch.setattr(os, "fsync", lambda fd: 1 / 0)  # the disk fails while writing
    for target in ("old", "new"):  # the old file or directory kept, the new one not made
        with pytest.raises(ZeroDivisionError):
            save(trained(nb, seed=1), tmp_path / target)
    assert files() == before


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_nan(adapter):
    adapter["tensors"]["2.lora.B"][3, 1] = float("nan")
    return adapter


# id: (the model: wrapped(nb, **these); the source: a trained DoRA MLP's adapter dict made into
#      another by a function, in a file if it makes bytes; what the error says)
LOAD_ERRORS = {
    "other rank": ({"rank": 8}, None, "layer '0': the file has rank 4, the model rank 8; wrap"),
    "other alpha": ({"alpha": 16}, None, "wrap the model with alpha=8"),
    "LoRA model": ({"cls": "LinearWithLoRA"}, None, "a DORA adapter, the model LORA: wrap it"),
    "other layers": ({"sizes": (40, 32, 10)}, None, "adapters for ['0', '2', '4'], the model"),
    "other sizes": ({"sizes": (40, 16, 24, 10)}, None, "'0.lora.B': shape (32, 4) in the file"),
    "missing tensor": ({}, lambda a: {**a, "tensors": {}}, "'2.m': only in the model"),
    "nan in a file": ({}, lambda a: saved(with_nan(a)), "'2.lora.B' is not a tensor of finite"),
    "a model's state dict": ({}, lambda a: saved(nn.Linear(2, 2).state_dict()), "not an adapter"),
    "pickled code": ({}, lambda a: saved({**a, "layers": copy.copy}), "is not an adapter file"),
    "a directory": ({}, lambda a: Path("."), "a directory: for a PEFT adapter use load_peft_"),
    "text file": ({}, lambda a: b"not a checkpoint\n", "is not an adapter file"),
    "no adapters in the model": ({"cls": None}, None, "no adapter layers"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_refuses_what_does_not_fit_and_leaves_the_model_untouched(nb, tmp_path, case):
    """Never torch's weights_only message, which advises weights_only=False (unsafe)."""
    target, make_source, says = LOAD_ERRORS[case]
    source = (make_source or dict)(adapter_state_dict(trained(nb)))
    if isinstance(source, bytes):
        (tmp_path / "adapter.pt").write_bytes(source)
        source = tmp_path / "adapter.pt"
    message = load_error(wrapped(nb, **target), source)
    assert says in message and "weights_only" not in message, message


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
    assert set(mine) == {n for n, p in model.named_parameters() if p.requires_grad}  # no more
    assert set(back["tensors"]) == set(mine)
    assert all(torch.equal(back["tensors"][k], mine[k]) for k in mine)
    with pytest.raises(ValueError, match="unrecognised adapter tensor"):
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
