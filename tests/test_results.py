"""The saved experiment results belong to the notebook as it is, and the README says what they say.

* ``experiments/lr_sweep.json`` and ``experiments/stability.json`` record the notebook settings
  they ran with: if a setting changes, these tests fail until the scripts are rerun.
* The learning rates are the sweep's best on the validation set, and the notebook uses them.
* The README's results are what ``tools/update_readme.py`` writes from figures/results.json (the
  notebook's summary cell writes it) and the stability runs: no hand copies, no printed text
  parsed back. The summary cell's printed output is that file's data, formatted.
"""

import json

import nbformat
import numpy as np
import pytest

import helpers
from dora_tutorial.notebook import protocol
from tools import update_readme

REPO = helpers.REPO
NOTEBOOK = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
SWEEP = json.loads((REPO / "experiments" / "lr_sweep.json").read_text())
STABILITY = json.loads((REPO / "experiments" / "stability.json").read_text())
RESULTS = json.loads((REPO / "figures" / "results.json").read_text())


@pytest.mark.parametrize("saved", [SWEEP, STABILITY], ids=["lr_sweep", "stability"])
def test_scripts_ran_with_the_notebooks_settings(nb, saved):
    now = protocol(nb)  # a setting added later cannot have changed what the script did
    changed = {k for k, v in saved["protocol"].items() if now.get(k) != v}
    assert not changed, f"rerun the script: the notebook's settings {sorted(changed)} changed"


def test_the_settings_are_defined_once_in_the_notebook(nb):
    needed = {"SIZES", "RANK", "ALPHA", "BATCH_SIZE", "FT_EPOCHS", "SEEDS", "FT_TRAIN_SIZE"}
    assert needed <= set(nb.constants)
    assert len(nb.constants) == len(set(nb.constants)), "a setting is defined twice"
    assert len(nb.SEEDS) >= 10


def test_learning_rates_are_the_best_on_the_validation_set_and_the_notebook_uses_them():
    for method, rates in SWEEP["validation"].items():
        best = max(rates, key=lambda lr: rates[lr][0])
        assert SWEEP["chosen"][method] == float(best)
    source = "\n".join(c.source for c in NOTEBOOK.cells if c.cell_type == "code")
    assert 'json.loads(open("experiments/lr_sweep.json").read())' in source
    assert 'learning_rates = lr_sweep["chosen"]' in source
    assert "learning_rates[method]" in source


def test_rates_at_rank_1_and_the_top_rank_are_the_best_on_the_validation_set(nb):
    """by_rank: LoRA's and DoRA's rates chosen again at rank 1 and at RANKS[-1], alpha scaled
    as the notebook's rank sweep scales it; the validation table covers every rate."""
    p = protocol(nb)
    ranks = sorted({1, p["RANKS"][-1]} - {p["RANK"]})
    assert [int(r) for r in SWEEP["by_rank"]] == ranks
    for rank, choice in SWEEP["by_rank"].items():
        assert choice["rank"] == int(rank)
        assert choice["alpha"] == p["ALPHA"] * int(rank) / p["RANK"]
        assert set(choice["chosen"]) == set(choice["validation"]) == {"LoRA", "DoRA"}
        for method, rates in choice["validation"].items():
            assert set(rates) == {f"{lr:g}" for lr in choice["rates"]}
            best = max(rates, key=lambda lr: rates[lr][0])
            assert choice["chosen"][method] == float(best)
            for lr, (mean, std) in rates.items():
                assert f"{mean:.2f} ± {std:.2f}" in choice["table"], (rank, method, lr)
        assert f"rank {rank}, alpha" in choice["table"]


def test_every_variant_reports_every_conclusion():
    committed = RESULTS["conclusions"]
    assert len(committed) >= 7
    for name, verdicts in STABILITY["variants"].items():
        assert set(verdicts) == set(committed), name
        assert set(STABILITY["sentences"][name]) == set(committed), name


def test_readme_results_are_written_from_the_results_file():
    readme = (REPO / "README.md").read_text()
    section = update_readme.render(RESULTS, STABILITY)
    assert update_readme.updated_readme(readme, section) == readme, (
        "README.md is out of date: run python -m tools.update_readme"
    )


def test_the_printed_summary_is_the_results_file():
    """The summary cell's stored output is exactly figures/results.json, formatted: a run that
    printed one thing and saved another, or a stale file, fails here."""
    cell = next(c for c in NOTEBOOK.cells if "summary" in c.metadata.get("tags", []))
    printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    assert printed.rstrip("\n") == helpers.summary_text(RESULTS)
    assert RESULTS["seeds"] == len(STABILITY["protocol"]["SEEDS"])
    assert [row["method"] for row in RESULTS["methods"]] == ["full FT", "LoRA", "DoRA"]


def test_write_results_goes_where_the_environment_says(tmp_path, monkeypatch):
    summary = {"seeds": 1, "pretrained_accuracy": 50.0, "methods": [], "conclusions": {}}
    monkeypatch.setenv("DORA_RESULTS", str(tmp_path / "r.json"))
    assert helpers.write_results(summary) == tmp_path / "r.json"
    assert json.loads((tmp_path / "r.json").read_text()) == summary
    monkeypatch.delenv("DORA_RESULTS")
    monkeypatch.setattr("dora_tutorial.summary.RESULTS_FILE", tmp_path / "default.json")
    assert helpers.write_results(summary) == tmp_path / "default.json"


def test_summary_round_trips_through_json(nb):
    """run_summary's data survives JSON unchanged, so the file prints what the run printed."""
    acc = np.array([[0.5, 0.900], [0.5, 0.915], [0.5, 0.920]])  # (seeds, epochs)
    runs = helpers.Runs(
        seeds=(0, 1, 2), models=[], trainable=1234, train_loss=acc, test_acc=acc, seconds=[0.5]
    )
    c = helpers.compare_values("a", [91.0, 92.0, 93.5], "b", [90.0, 91.0, 92.0])
    conclusions = {"a vs b": ("ahead", "a is ahead of b by 1.00 points (...).", [c])}
    summary = helpers.run_summary({"LoRA": runs}, 0.4276, conclusions)
    again = json.loads(json.dumps(summary))
    assert again == summary and helpers.summary_text(again) == helpers.summary_text(summary)
    text = helpers.summary_text(summary)
    assert "LoRA" in text and "1,234" in text and "91.17 ± 1.04" in text and "42.76%" in text
    assert "a vs b                        ahead" not in text  # the verdict column is sized
    assert "a vs b  ahead" in text and "- a vs b: a is ahead of b" in text
