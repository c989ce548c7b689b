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
from dora_tutorial import atomic_write
from support import load_error, looks_trained, peft_with_values_of_its_own, rel

X = torch.randn(7, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def mlp(bias=True):
    torch.manual_seed(0)
    layers = (nn.Linear(30, 20, bias=bias), nn.Tanh(), nn.Linear(20, 12, bias=bias))
    return nn.Sequential(*layers).double()


def wrapped(nb, cls="LinearWithDoRA", base=None, rank=4, alpha=8, seed=None):
    """base (mlp() if None) wrapped with cls; its adapters look trained unless seed is None."""
    model = helpers.add_adapters(mlp() if base is None else base, getattr(nb, cls), rank, alpha)
    return model if seed is None else looks_trained(model, seed, b_std=0.2, m_spread=0.3)


@pytest.mark.parametrize("cls", ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])
def test_own_round_trip_through_a_directory(nb, cls, tmp_path):
    ours = wrapped(nb, cls, seed=1)
    directory = helpers.save_peft_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp directory left
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (cls != "LinearWithLoRA")
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] is False
    assert torch.equal(helpers.load_peft_adapter(wrapped(nb, cls), directory)(X), ours(X))


def test_save_replaces_an_earlier_adapter_but_nothing_else(nb, tmp_path):
    directory = tmp_path / "adapter"
    helpers.save_peft_adapter(wrapped(nb, seed=1), directory)
    second = wrapped(nb, seed=2)
    helpers.save_peft_adapter(second, directory)  # an earlier save: replaced as a whole
    assert torch.equal(helpers.load_peft_adapter(wrapped(nb), directory)(X), second(X))
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        helpers.save_peft_adapter(second, directory)
    assert (directory / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="other things"):
        helpers.save_peft_adapter(second, directory / "notes.txt")


def test_a_failed_save_leaves_the_old_directory_and_no_temp_files(nb, tmp_path, monkeypatch):
    model = wrapped(nb, seed=1)
    directory = helpers.save_peft_adapter(model, tmp_path / "adapter")
    good = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_write, calls = atomic_write.write_atomic, []

    def write_then_fail(path, chunks):  # the second file fails: disk full
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, chunks)

    monkeypatch.setattr(atomic_write, "write_atomic", write_then_fail)
    for target in (directory, tmp_path / "new"):  # an old directory kept; a new one not made
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            helpers.save_peft_adapter(wrapped(nb, seed=9), target)
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == good


def test_unreadable_directories_are_refused_with_the_file_named(nb, tmp_path):
    fresh = wrapped(nb)
    assert "no adapter_config.json" in load_error(fresh, tmp_path, helpers.load_peft_adapter)
    directory = helpers.save_peft_adapter(wrapped(nb, seed=1), tmp_path / "a")
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    for damage, says in [
        (lambda: weights.write_bytes(b"not safetensors"), "cannot read the adapter tensors"),
        (weights.unlink, "no adapter_model.safetensors"),
        (lambda: config.write_text("{"), "not valid JSON"),
    ]:
        damage()
        assert says in load_error(fresh, directory, helpers.load_peft_adapter)
    with pytest.raises(ValueError, match="load_peft_adapter"):  # our file format's loader
        helpers.load_adapter(fresh, directory)


def edited(directory, tmp_path, config=None, drop=(), nan=None):
    """A copy of a saved adapter directory: config entries changed, tensors dropped or one
    entry of tensor ``nan`` made NaN."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "edited"
    out.mkdir()
    options = json.loads((directory / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**options, **(config or {})}))
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    if nan:
        tensors[nan][0] = float("nan")
    save_file(tensors, out / "adapter_model.safetensors")
    return out


M2 = "base_model.model.2.lora_magnitude_vector"
# id: (config changes, tensors dropped, the model: wrapped(nb, **these), what the error says)
REFUSALS = {
    "rslora": ({"use_rslora": True}, (), {}, "use_rslora=True: scales the update by alpha/sqrt"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, (), {}, "fan_in_fan_out=True"),
    "trained bias": ({"bias": "all"}, (), {}, "bias='all': trains the base layers' biases"),
    "lora bias": ({"lora_bias": True}, (), {}, "lora_bias=True"),
    "modules to save": ({"modules_to_save": ["1"]}, (), {}, "modules_to_save=['1']"),
    "unknown option": ({"use_future_trick": 3}, (), {}, "use_future_trick=3: an option"),
    "pissa": ({"init_lora_weights": "pissa"}, (), {}, "changes the base weights"),
    "not lora": ({"peft_type": "IA3"}, (), {}, "peft_type='IA3'"),
    "rank in config": ({"r": 8}, (), {}, "the config says rank 8, its tensors have 4"),
    "missing magnitude": ({}, (M2,), {}, "layer '2': use_dora=True but no"),
    "magnitude without dora": ({"use_dora": False}, (), {}, "but use_dora=False"),
    "nan": ({}, (), {}, f"tensor '{M2}' holds 1 NaN"),
    "other rank": ({}, (), {"rank": 2}, "the file has rank 4, the model rank 2; wrap the model"),
    "other alpha": ({}, (), {"alpha": 16}, "wrap with alpha=8"),
    "other kind": ({}, (), {"cls": "LinearWithLoRA"}, "holds a DORA adapter"),
    "one layer": ({}, ("model.2.",), {}, "other layers"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_directories_that_do_not_fit_are_refused(nb, tmp_path, case):
    config, drop, model, message = REFUSALS[case]
    saved = helpers.save_peft_adapter(wrapped(nb, seed=1), tmp_path / "a")
    source = edited(saved, tmp_path, config, drop, nan=M2 if case == "nan" else None)
    assert message in load_error(wrapped(nb, **model), source, helpers.load_peft_adapter)


# ----------------------------------------------------------------------------- with PEFT


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", reason="peft is a test dependency: pip install peft")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cls", ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])
def test_ours_to_peft_from_pretrained(nb, peft, cls, bias, tmp_path):
    base = mlp(bias)
    ours = wrapped(nb, cls, base, rank=16, seed=1)  # the 12-unit head: clipped to rank 12
    directory = helpers.save_peft_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    assert theirs.peft_config["default"].use_dora == (cls != "LinearWithLoRA")
    with torch.no_grad():
        assert rel(theirs(X), ours(X)) <= 1e-12
        merged_theirs = theirs.merge_and_unload().state_dict()
        merged_ours = helpers.merge_adapters(ours, nb.merge).state_dict()
    assert list(merged_ours) == list(merged_theirs)
    assert all(rel(merged_ours[k], merged_theirs[k]) <= 1e-12 for k in merged_ours)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_save_pretrained_to_ours(nb, peft, use_dora, bias, tmp_path):
    base = mlp(bias)
    config = peft.LoraConfig(
        r=3, lora_alpha=5, use_dora=use_dora, lora_dropout=0.1, target_modules=["0", "2"]
    )
    theirs = peft_with_values_of_its_own(base, config)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = wrapped(nb, "DoRALinear" if use_dora else "LinearWithLoRA", base, 3, 5)
    helpers.load_peft_adapter(ours, tmp_path / "theirs")
    theirs.eval()
    with torch.no_grad():
        assert rel(ours(X), theirs(X)) <= 1e-12


@pytest.mark.parametrize(
    "options, says",
    [
        ({"use_rslora": True, "target_modules": ["0", "2"]}, "use_rslora=True"),
        ({"use_dora": True, "target_modules": ["0"]}, "other layers"),
    ],
    ids=["rslora", "other-target-layers"],
)
def test_peft_directories_that_do_not_fit_are_refused(nb, peft, tmp_path, options, says):
    base = mlp()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **options))
    model.save_pretrained(tmp_path / "theirs")
    ours = wrapped(nb, "LinearWithDoRA" if options.get("use_dora") else "LinearWithLoRA", base)
    assert says in load_error(ours, tmp_path / "theirs", helpers.load_peft_adapter)
