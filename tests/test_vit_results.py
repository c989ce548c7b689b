"""experiments/vit.json's own checks: its settings, and its Figure 2 points on every query and
value matrix after every epoch, for every seed (the checks it shares with cnn.json are in
tests/test_cnn_results.py)."""

import json

import pytest

import helpers
from dora_tutorial.notebook import protocol
from experiments import vit

VIT = json.loads((helpers.REPO / "experiments" / "vit.json").read_text())


def test_vit_ran_with_its_own_settings():
    assert VIT["settings"] == vit.SETTINGS, "rerun experiments/vit.py: its settings changed"


def test_figure2_follows_exactly_the_adapted_matrices():
    adapted = {name for name, m in vit.ViT().named_modules() if isinstance(m, vit.QueryValue)}
    assert set(vit.FIGURE2_LAYERS) == adapted and len(adapted) == 2 * vit.BLOCKS


@pytest.mark.parametrize("method", ["full FT", "LoRA", "DoRA"])
def test_vit_points_cover_every_matrix_checkpoint_and_seed_once(nb, method):
    seeds = protocol(nb)["SEEDS"][: vit.N_SEEDS]
    checkpoints = range(1, protocol(nb)["FT_EPOCHS"] + 1)
    keys = [(p["seed"], p["checkpoint"], p["layer"]) for p in VIT["points"][method]]
    expected = {(s, c, n) for s in seeds for c in checkpoints for n in vit.FIGURE2_LAYERS}
    assert sorted(keys) == sorted(expected)
