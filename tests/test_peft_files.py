"""PEFT adapter directories: what replaces what, the refusals, and both ways with PEFT itself
(``save_peft_adapter`` -> ``PeftModel.from_pretrained``, ``save_pretrained`` ->
``load_peft_adapter``; skipped without PEFT)."""

import copy
import json

import pytest
import torch
from torch import nn

import helpers
from support import load_error, looks_trained, rel

X = torch.randn(7, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def mlp(bias=True):
    torch.manual_seed(0)
    layers = (nn.Linear(30, 20, bias=bias), nn.Tanh(), nn.Linear(20, 12, bias=bias))
    return nn.Sequential(*layers).double()


def wrapped(nb, cls="LinearWithDoRA", base=None, rank=4, alpha=8, seed=None):
    """base (mlp() if None) wrapped with cls; its adapters look trained unless seed is None."""
    model = helpers.add_adapters(mlp() if base is None else base, getattr(nb, cls), rank, alpha)
    return model if seed is None else looks_trained(model, seed, b_std=0.2, m_spread=0.3)


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


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
M2 = "base_model.model.2.lora_magnitude_vector"


def options(**changes):
    def change(directory):
        path = directory / CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return change


def tensors(change):
    def apply(directory):
        from safetensors.torch import load_file, save_file

        saved = load_file(directory / WEIGHTS)
        change(saved)
        save_file(saved, directory / WEIGHTS)

    return apply


# id: (what is done to a saved DoRA adapter directory, what the error says)
REFUSALS = {
    "no config": (lambda d: (d / CONFIG).unlink(), "config.json' (FileNotFoundError"),
    "bad JSON": (lambda d: (d / CONFIG).write_text("{"), "config.json' (JSONDecodeError"),
    "no tensors": (lambda d: (d / WEIGHTS).unlink(), "safetensors' (FileNotFoundError"),
    "bad tensors": (lambda d: (d / WEIGHTS).write_text("no"), "safetensors' (SafetensorError"),
    "rslora": (options(use_rslora=True), "use_rslora=True: not implemented here; train"),
    "trained bias": (options(bias="all"), "bias='all'"),
    "unknown option": (options(use_future_trick=3), "use_future_trick=3"),
    "pissa": (options(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "not lora": (options(peft_type="IA3"), "peft_type='IA3'"),
    "no alpha": (options(lora_alpha=None), "no lora_alpha: pass the LoraConfig"),
    "rank in config": (options(r=8), "the config says rank 8, its tensors have 4"),
    "magnitude without dora": (options(use_dora=False), "a LORA adapter, the model DORA"),
    "other alpha": (options(lora_alpha=16), "wrap the model with alpha=16"),
    "missing magnitude": (tensors(lambda t: t.pop(M2)), "'2.m': only in the model"),
    "nan": (tensors(lambda t: t[M2].fill_(float("nan"))), f"'{M2}' is not a tensor of finite"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_directories_that_do_not_fit_are_refused(nb, tmp_path, case):
    damage, says = REFUSALS[case]
    directory = helpers.save_peft_adapter(wrapped(nb, seed=1), tmp_path / "a")
    damage(directory)
    assert says in load_error(wrapped(nb), directory, helpers.load_peft_adapter)


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft", reason="peft is a test dependency: pip install peft")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cls", ["LinearWithLoRA", "LinearWithDoRA", "DoRALinear"])
def test_ours_to_peft_and_back(nb, peft, cls, bias, tmp_path):
    """PEFT loads our directory (a head clipped to rank 12 included), its save_pretrained ours."""
    base = mlp(bias)
    ours = wrapped(nb, cls, base, rank=16, seed=1)
    directory = helpers.save_peft_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    theirs.save_pretrained(tmp_path / "theirs")
    back = helpers.load_peft_adapter(wrapped(nb, cls, base, rank=16), tmp_path / "theirs")
    with torch.no_grad():
        assert rel(theirs(X), ours(X)) <= 1e-12 and torch.equal(back(X), ours(X))
        merged_theirs = theirs.merge_and_unload().state_dict()
        merged_ours = helpers.merge_adapters(ours, nb.merge).state_dict()
    assert list(merged_ours) == list(merged_theirs)
    assert all(rel(merged_ours[k], merged_theirs[k]) <= 1e-12 for k in merged_ours)
