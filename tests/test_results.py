"""The saved experiment results belong to the notebook as it is, and the README says what they say.

* ``experiments/lr_sweep.json`` and ``experiments/stability.json`` record the notebook settings
  they ran with: if a setting changes, these tests fail until the scripts are rerun.
* The learning rates are the sweep's best on the validation set, and the notebook uses them.
* The README's results are what ``tools/update_readme.py`` writes from the stored outputs and the
  stability runs: no hand copies.
"""

import json

import nbformat
import pytest

import helpers
from tools import update_readme
from tools.notebook_definitions import protocol

REPO = helpers.REPO
NOTEBOOK = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
SWEEP = json.loads((REPO / "experiments" / "lr_sweep.json").read_text())
STABILITY = json.loads((REPO / "experiments" / "stability.json").read_text())


@pytest.mark.parametrize("saved", [SWEEP, STABILITY], ids=["lr_sweep", "stability"])
def test_scripts_ran_with_the_notebooks_settings(nb, saved):
    assert saved["protocol"] == protocol(nb), "rerun the script: the notebook's settings changed"


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
    assert "lr=learning_rates[method]" in source


def test_every_variant_reports_every_conclusion():
    committed = update_readme.verdicts_of(NOTEBOOK)
    assert len(committed) >= 7
    for name, verdicts in STABILITY["variants"].items():
        assert set(verdicts) == set(committed), name


def test_readme_results_are_written_from_the_stored_outputs():
    readme = (REPO / "README.md").read_text()
    section = update_readme.render(NOTEBOOK, STABILITY)
    assert update_readme.updated_readme(readme, section) == readme, (
        "README.md is out of date: run tools/update_readme.py"
    )


def test_verdict_table_round_trip():
    verdicts = {
        "short": "ahead",
        "a longer conclusion": "ahead at rank 1; behind at no rank; " + "no difference " * 8,
    }
    text = "before\n" + helpers.verdict_table(verdicts) + "\n\n- short: a sentence"
    assert update_readme.parse_verdict_table(text) == {
        k: " ".join(v.split()) for k, v in verdicts.items()
    }
    assert update_readme.sentences(text) == {"short": "a sentence"}
