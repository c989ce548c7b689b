"""The evidence behind the README: learning-rate grids widened until the best rate is inside,
the pooled design across pretrained networks, and the README written from the experiments' JSON."""

import json
from pathlib import Path

import numpy as np
import pytest

import helpers
from dora_tutorial import evidence as ev
from dora_tutorial.notebook import protocol
from experiments.common import tune, widen
from tools import update_readme

REPO = Path(__file__).resolve().parents[1]
EVIDENCE = ev.load()


def test_the_experiment_ran_with_the_notebooks_settings(nb):
    assert EVIDENCE["protocol"] == protocol(nb)


@pytest.mark.parametrize(
    ("peak", "grid", "tried"),
    [
        (1e-2, (1e-3, 2e-3, 5e-3), (1e-3, 2e-3, 5e-3, 1e-2, 2e-2)),  # widened upwards twice
        (2e-4, (1e-3, 2e-3, 5e-3), (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)),  # downwards
        (2e-3, (1e-3, 2e-3, 5e-3), (1e-3, 2e-3, 5e-3)),  # inside: as it is
    ],
)
def test_a_grid_widens_until_its_best_rate_is_inside(peak, grid, tried):
    scores = tune(lambda lr: -abs(np.log(lr / peak)), grid)
    assert tuple(scores) == pytest.approx(tried)
    assert widen(list(scores), max(scores, key=scores.get)) is None


def synthetic(network_effects, held_out_effect=0.0, seeds=10):
    """An evidence dict with DoRA - LoRA = ``network_effects[j]`` on network j (ranks 1 and 4,
    every other comparison 0), plus a held-out network."""
    rng = np.random.default_rng(0)
    accuracy = []
    for effect in [*network_effects, held_out_effect]:
        base = 80 + rng.normal(0, 2) + rng.normal(0, 0.5, seeds)  # network, then seeds
        net = {"full FT": base, "scaled LoRA r1": base}
        for r in (1, 4):
            net[f"LoRA r{r}"] = base + rng.normal(0, 0.1, seeds)
            net[f"DoRA r{r}"] = base + effect + rng.normal(0, 0.1, seeds)
        accuracy.append({k: list(v) for k, v in net.items()})
    trainable = {"full FT": 9999, "scaled LoRA r1": 120, "LoRA r1": 100, "DoRA r1": 120}
    return {
        "protocol": {"RANKS": [1, 4], "RANK": 4, "SEEDS": list(range(seeds))},
        "networks": len(network_effects),
        "trainable": trainable | {"LoRA r4": 400, "DoRA r4": 420},
        "accuracy": accuracy,
        "float_noise": {"kernels": ["a", "b"], "accuracy": [[1.0, 2.0, 3.0], [1.5, 2.0, 2.5]]},
    }


def test_pooled_is_paired_within_networks_and_tested_across_them():
    effects = [1.0, 0.2, 1.8, 0.6, 1.4, 1.0]
    found = ev.pooled(synthetic(effects))
    c = found["DoRA - LoRA, rank 1"]
    assert c.n == len(effects) and c.df == len(effects) - 1  # networks are the replicates
    assert c.diff == pytest.approx(np.mean(effects), abs=0.1)
    spread = np.std(effects, ddof=1) / np.sqrt(len(effects))
    assert c.se == pytest.approx(spread, rel=0.2)  # the networks' spread, not the seeds'
    budget, ablation = "DoRA - LoRA, equal budget, rank 1", "DoRA - scaled LoRA, rank 1"
    assert len(found) == 6 and {budget, ablation, "full FT - DoRA, rank 4"} <= set(found)
    assert all(c.family == len(found) for c in found.values())  # one Holm family


def test_the_held_out_network_stays_out_of_the_analysis():
    a, b = synthetic([1.0] * 4, held_out_effect=0.0), synthetic([1.0] * 4, held_out_effect=9.0)
    key = "DoRA - LoRA, rank 4"
    assert ev.pooled(a)[key].diff == ev.pooled(b)[key].diff
    assert ev.held_out(b)[key].diff == pytest.approx(9.0, abs=0.2)


def test_a_result_is_stated_only_when_its_adjusted_interval_excludes_zero():
    found = ev.pooled(synthetic([1.0, 1.1, 0.9, 1.0, 1.05, 0.95]))
    for name, c in found.items():
        low, high = c.verdict_interval
        assert (c.verdict != "no difference detected") == (low > 0 or high < 0), name
    said = ev.findings(found)
    assert said[0].startswith("At rank 1, each method at its own tuned rate: DoRA ahead of LoRA")
    assert "full FT behind DoRA" in said[3]
    none = ev.finding(found["scaled LoRA - LoRA, rank 1"], "The scale alone")
    assert "no difference detected" in none and "are ruled out" in none


def test_float_noise_is_one_number_beside_the_seed_spread():
    noise, spread = ev.float_noise(synthetic([0.0, 0.0]))
    assert noise == pytest.approx(np.std([-0.5, 0.0, 0.5], ddof=1) / np.sqrt(2))
    assert spread == pytest.approx(1.0)


def test_the_readme_and_its_detail_page_are_written_from_the_experiments():
    vit = json.loads((REPO / "experiments" / "vit.json").read_text())
    mlp = json.loads((REPO / "figures" / "results.json").read_text())["figure2"]
    found = ev.pooled(EVIDENCE)
    section = update_readme.render(EVIDENCE, found, mlp, vit)
    readme = (REPO / "README.md").read_text()
    assert update_readme.updated_readme(readme, section) == readme, "run tools.update_readme"
    assert len(section) <= 2500 + len(update_readme.START + update_readme.END)
    assert (REPO / "experiments" / "RESULTS.md").read_text() == update_readme.detail(
        EVIDENCE, found
    )


def test_write_results_goes_where_the_environment_says(tmp_path, monkeypatch):
    summary = {"seeds": 1, "methods": [], "comparisons": {}}
    monkeypatch.setenv("DORA_RESULTS", str(tmp_path / "r.json"))
    assert helpers.write_results(summary) == tmp_path / "r.json"
    assert json.loads((tmp_path / "r.json").read_text()) == summary
    monkeypatch.delenv("DORA_RESULTS")
    monkeypatch.setattr("dora_tutorial.summary.RESULTS_FILE", tmp_path / "default.json")
    assert helpers.write_results(summary) == tmp_path / "default.json"
