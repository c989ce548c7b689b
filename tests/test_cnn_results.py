"""experiments/cnn.json belongs to the notebook as it is, and the notebook prints it unchanged.

* It records the notebook settings it ran with: if a setting changes, this fails until
  ``experiments/cnn.py`` is rerun (as tests/test_evidence.py does for the MLP's).
* Its learning rates are the best on the validation set, and its sentences are what
  ``helpers.Comparison`` writes from its numbers: nothing in it was edited by hand.
* The notebook's CNN cell prints its table and sentences (nbval does not compare that cell's
  output, as the table holds timings, so the stored output is compared here).
"""

import json

import nbformat

import helpers
from dora_tutorial.notebook import protocol

REPO = helpers.REPO
CNN = json.loads((REPO / "experiments" / "cnn.json").read_text())


def test_cnn_experiment_ran_with_the_notebooks_settings(nb):
    assert CNN["protocol"] == protocol(nb), (
        "rerun experiments/cnn.py: the notebook's settings changed"
    )


def test_cnn_learning_rates_are_the_best_on_the_validation_set():
    assert set(CNN["chosen"]) == set(CNN["validation"]) == {"full FT", "LoRA", "DoRA"}
    for method, rates in CNN["validation"].items():
        assert set(rates) == {f"{lr:g}" for lr in CNN["rates"]}
        best = max(rates, key=lambda lr: rates[lr][0])
        assert CNN["chosen"][method] == float(best)


def test_cnn_sentences_come_from_the_saved_numbers(nb):
    comparisons = [helpers.Comparison(**c) for c in CNN["comparisons"]]
    for c, saved in zip(comparisons, CNN["sentences"], strict=True):  # the same numbers
        assert f"95 % CI {c.low:+.2f} to {c.high:+.2f}" in saved
    assert [(c.a, c.b) for c in comparisons] == [("DoRA", "LoRA"), ("full FT", "DoRA")]
    assert all(c.n == len(protocol(nb)["SEEDS"]) for c in comparisons)
    for method, final in CNN["final"].items():
        assert len(final) == len(protocol(nb)["SEEDS"])
        row = next(line for line in CNN["table"].splitlines() if line.startswith(method))
        assert f"{sum(final) / len(final):.2f} ±" in row


def test_the_notebook_prints_the_saved_cnn_results():
    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    cell = next(
        c
        for c in notebook.cells
        if c.cell_type == "code" and 'open("experiments/cnn.json")' in c.source
    )
    printed = "".join(out.get("text", "") for out in cell.outputs)
    assert CNN["table"] in printed and CNN["validation_table"] in printed
    flat = " ".join(printed.split())
    for c in CNN["comparisons"]:  # worded now, from the saved numbers
        assert " ".join(helpers.Comparison(**c).sentence().split()) in flat
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert ".venv/bin/python -m experiments.cnn" in markdown  # how to regenerate it
