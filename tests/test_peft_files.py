"""PEFT adapter directories both ways: ``helpers.save_peft_adapter`` -> PEFT's
``PeftModel.from_pretrained``, PEFT's ``save_pretrained`` -> ``helpers.load_peft_adapter``; the
refusals (each before anything is copied) and the atomic write. The parts that need PEFT are
skipped without it; our own round trip does not need it."""

import copy
import json

import pytest
import torch
from torch import nn

import helpers
from dora_tutorial import files
from support import load_error as adapter_load_error
from support import looks_trained, peft_with_values_of_its_own, rel

SIZES = (30, 20, 12)


def mlp(bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(SIZES[0], SIZES[1], bias=bias),
        nn.Tanh(),
        nn.Linear(SIZES[1], SIZES[2], bias=bias),
    ).to(dtype)


def trained(nb, cls, base, rank=4, alpha=8, seed=1, **kwargs):
    model = helpers.add_adapters(base, getattr(nb, cls), rank, alpha, **kwargs)
    return looks_trained(model, seed, b_std=0.2, m_spread=0.3)


def x_for(dtype=torch.float64):
    return torch.randn(7, SIZES[0], generator=torch.Generator().manual_seed(5), dtype=dtype)


def load_error(model, directory) -> str:
    """The ValueError's message; the model must be untouched."""
    return adapter_load_error(model, directory, helpers.load_peft_adapter)


# ----------------------------------------------------------------------------- without PEFT


@pytest.mark.parametrize("cls", ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])
def test_own_round_trip_through_a_directory(nb, cls, tmp_path):
    base = mlp()
    ours = trained(nb, cls, base)
    directory = helpers.save_peft_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp directory left
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (cls != "LinearWithLoRA")
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is False
    fresh = helpers.add_adapters(base, getattr(nb, cls), 4, 8)
    helpers.load_peft_adapter(fresh, directory)
    assert torch.equal(fresh(x_for()), ours(x_for()))


def test_save_replaces_an_earlier_adapter_but_nothing_else(nb, tmp_path):
    base = mlp()
    first, second = (
        trained(nb, "LinearWithDoRA", base, seed=1),
        trained(nb, "LinearWithDoRA", base, seed=2),
    )
    directory = tmp_path / "adapter"
    helpers.save_peft_adapter(first, directory)
    helpers.save_peft_adapter(second, directory)  # an earlier save: replaced as a whole
    fresh = helpers.add_adapters(base, nb.LinearWithDoRA, 4, 8)
    helpers.load_peft_adapter(fresh, directory)
    assert torch.equal(fresh(x_for()), second(x_for()))
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        helpers.save_peft_adapter(first, directory)
    assert (directory / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="other things"):
        helpers.save_peft_adapter(first, directory / "notes.txt")


def test_a_failed_save_leaves_the_old_directory_and_no_temp_files(nb, tmp_path, monkeypatch):
    base = mlp()
    model = trained(nb, "LinearWithDoRA", base)
    directory = helpers.save_peft_adapter(model, tmp_path / "adapter")
    good = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_write = files.write_atomic
    calls = []

    def write_then_fail(path, chunks):  # the second file fails: disk full
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, chunks)

    monkeypatch.setattr(files, "write_atomic", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        helpers.save_peft_adapter(trained(nb, "LinearWithDoRA", base, seed=9), directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == good
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with pytest.raises(OSError, match="disk full"):  # a new directory: none at all afterwards
        calls.clear()
        helpers.save_peft_adapter(model, tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_unreadable_directories_are_refused_with_the_file_named(nb, tmp_path):
    base = mlp()
    model = trained(nb, "LinearWithDoRA", base)
    fresh = helpers.add_adapters(base, nb.LinearWithDoRA, 4, 8)
    assert "no adapter_config.json" in load_error(fresh, tmp_path)
    directory = helpers.save_peft_adapter(model, tmp_path / "a")
    (directory / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert "cannot read the adapter tensors" in load_error(fresh, directory)
    (directory / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors" in load_error(fresh, directory)
    (directory / "adapter_config.json").write_text("{")
    assert "not valid JSON" in load_error(fresh, directory)
    with pytest.raises(ValueError, match="load_peft_adapter"):  # our file format's loader
        helpers.load_adapter(fresh, directory)


def edited(directory, tmp_path, config=None, drop=(), name="edited"):
    """A copy of a saved adapter directory with config entries changed or tensors dropped."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    out.mkdir()
    options = json.loads((directory / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**options, **(config or {})}))
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    save_file(tensors, out / "adapter_model.safetensors")
    return out


REFUSALS = {
    "rslora": ({"use_rslora": True}, (), "use_rslora=True: scales the update by alpha/sqrt(r)"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, (), "fan_in_fan_out=True"),
    "trained bias": ({"bias": "all"}, (), "bias='all': trains the base layers' biases"),
    "lora bias": ({"lora_bias": True}, (), "lora_bias=True"),
    "modules to save": ({"modules_to_save": ["1"]}, (), "modules_to_save=['1']"),
    "unknown option": ({"use_future_trick": 3}, (), "use_future_trick=3: an option"),
    "pissa": ({"init_lora_weights": "pissa"}, (), "changes the base weights"),
    "not lora": ({"peft_type": "IA3"}, (), "peft_type='IA3'"),
    "rank in config": ({"r": 8}, (), "the config says rank 8, its tensors have 4"),
    "missing magnitude": ({}, ("2.lora_magnitude_vector",), "layer '2': use_dora=True but no"),
    "magnitude without dora": ({"use_dora": False}, (), "but use_dora=False"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_options_the_layers_do_not_implement_are_refused(nb, tmp_path, case):
    config, drop, message = REFUSALS[case]
    base = mlp()
    saved = helpers.save_peft_adapter(trained(nb, "LinearWithDoRA", base), tmp_path / "a")
    fresh = helpers.add_adapters(base, nb.LinearWithDoRA, 4, 8)
    assert message in load_error(fresh, edited(saved, tmp_path, config, drop))


def test_directories_that_do_not_fit_the_model_say_what_differs(nb, tmp_path):
    base = mlp()
    saved = helpers.save_peft_adapter(trained(nb, "LinearWithDoRA", base), tmp_path / "a")
    other_rank = helpers.add_adapters(base, nb.LinearWithDoRA, 2, 8)
    assert "the file has rank 4, the model rank 2; wrap the model with rank=4" in load_error(
        other_rank, saved
    )
    other_alpha = helpers.add_adapters(base, nb.LinearWithDoRA, 4, 16)
    assert "wrap with alpha=8" in load_error(other_alpha, saved)
    lora = helpers.add_adapters(base, nb.LinearWithLoRA, 4, 8)
    assert "holds a DORA adapter" in load_error(lora, saved)
    one_layer = edited(saved, tmp_path, drop=("model.2.",), name="one-layer")
    assert "other layers" in load_error(
        helpers.add_adapters(base, nb.LinearWithDoRA, 4, 8), one_layer
    )


# ----------------------------------------------------------------------------- with PEFT


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", reason="peft is a test dependency: pip install peft")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cls", ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])
def test_ours_to_peft_from_pretrained(nb, peft, cls, bias, tmp_path):
    base = mlp(bias)
    ours = trained(nb, cls, base, rank=16)  # the 12-unit head: clipped to rank 12
    directory = helpers.save_peft_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    assert theirs.peft_config["default"].use_dora == (cls != "LinearWithLoRA")
    with torch.no_grad():
        assert rel(theirs(x_for()), ours(x_for())) <= 1e-12
        merged_theirs = theirs.merge_and_unload()
        merged_ours = helpers.merge_adapters(ours, nb.merge)
    for (n1, w1), (n2, w2) in zip(
        merged_ours.state_dict().items(), merged_theirs.state_dict().items(), strict=True
    ):
        assert n1 == n2 and rel(w1, w2) <= 1e-12, n1


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_save_pretrained_to_ours(nb, peft, use_dora, bias, tmp_path):
    base = mlp(bias)
    config = peft.LoraConfig(
        r=3, lora_alpha=5, use_dora=use_dora, lora_dropout=0.1, target_modules=["0", "2"]
    )
    theirs = peft_with_values_of_its_own(base, config)
    theirs.save_pretrained(tmp_path / "theirs")
    cls = nb.DoRALinear if use_dora else nb.LinearWithLoRA
    ours = helpers.add_adapters(base, cls, 3, 5)
    helpers.load_peft_adapter(ours, tmp_path / "theirs")
    theirs.eval()
    with torch.no_grad():
        assert rel(ours(x_for()), theirs(x_for())) <= 1e-12
    wrong_kind = helpers.add_adapters(
        base, nb.LinearWithLoRA if use_dora else nb.LinearWithDoRA, 3, 5
    )
    assert "adapter" in load_error(wrong_kind, tmp_path / "theirs")


def test_peft_rslora_directory_is_refused(nb, peft, tmp_path):
    base = mlp()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["0", "2"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "rs")
    ours = helpers.add_adapters(base, nb.LinearWithLoRA, 4, 8)
    assert "use_rslora=True" in load_error(ours, tmp_path / "rs")


def test_peft_directory_with_other_target_layers_is_refused(nb, peft, tmp_path):
    base = mlp()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "one")
    ours = helpers.add_adapters(base, nb.LinearWithDoRA, 4, 8)
    message = load_error(ours, tmp_path / "one")
    assert "other layers" in message and "'2'" in message
