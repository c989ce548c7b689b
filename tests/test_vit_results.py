"""experiments/vit.json belongs to the notebook as it is, and the notebook shows it unchanged.

* It records the notebook settings it ran with and its own: if either changes, this fails until
  ``experiments/vit.py`` is rerun (as tests/test_cnn_results.py does for the CNN).
* Its learning rates are the best on the validation set; its sentences are what
  ``helpers.Comparison`` writes from its numbers; its Figure 2 analysis is what
  ``helpers.figure2_analysis`` computes from its saved points (the notebook recomputes it).
* It covers the query and value matrices of every block after every epoch, for every seed.
* The notebook's ViT cell shows its figure and print its tables and conclusions (that cell's
  output is not compared by nbval, as the table holds timings, so it is compared here).
"""

import json
import math

import nbformat

import helpers
from dora_tutorial.notebook import protocol
from experiments import vit

REPO = helpers.REPO
VIT = json.loads((REPO / "experiments" / "vit.json").read_text())


def assert_close(a, b, path="figure2"):
    """Equal structure and strings; numbers equal to 1e-9 relative (other numpy and scipy
    versions round the last digits of an interval differently)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_vit_experiment_ran_with_the_notebooks_settings_and_its_own(nb):
    assert VIT["protocol"] == {key: protocol(nb)[key] for key in vit.USED}, (
        "rerun experiments/vit.py: the notebook's settings changed"
    )
    assert VIT["settings"] == vit.settings(), "rerun experiments/vit.py: its settings changed"


def test_vit_learning_rates_are_the_best_of_four_or_more_and_none_at_an_edge():
    assert set(VIT["chosen"]) == set(VIT["validation"]) == {"full FT", "LoRA", "DoRA"}
    for method, rates in VIT["validation"].items():
        assert set(rates) == {f"{lr:g}" for lr in VIT["rates"][method]} and len(rates) >= 4
        best = max(rates, key=lambda lr: rates[lr][0])
        assert VIT["chosen"][method] == float(best)
        grid = sorted(map(float, rates))
        assert grid[0] < float(best) < grid[-1], f"{method}: {best} at the grid's edge"


def test_vit_points_cover_every_query_and_value_matrix_checkpoint_and_seed(nb):
    layers = vit.figure2_layers()
    assert len(layers) == 2 * vit.BLOCKS and all(n.endswith((".q", ".v")) for n in layers)
    seeds = list(protocol(nb)["SEEDS"])[: vit.N_SEEDS]
    for points in VIT["points"].values():
        keys = {(p["seed"], p["checkpoint"], p["layer"]) for p in points}
        epochs = range(1, protocol(nb)["FT_EPOCHS"] + 1)
        assert keys == {(s, c, n) for s in seeds for c in epochs for n in layers}
        assert len(points) == len(keys)


def test_vit_analysis_and_sentences_come_from_the_saved_numbers():
    analysis = helpers.figure2_analysis(VIT["points"], VIT["protocol"]["PAPER_CORRELATION"])
    saved = {key: value for key, value in VIT["figure2"].items() if key != "table"}
    assert_close(json.loads(json.dumps(analysis)), saved)  # the same code on the same points
    assert helpers.figure2_table(analysis) == VIT["figure2"]["table"]
    comparisons = [helpers.Comparison(**c) for c in VIT["comparisons"]]
    assert [(c.a, c.b) for c in comparisons] == [("DoRA", "LoRA"), ("full FT", "DoRA")]
    for c, sentence in zip(comparisons, VIT["sentences"], strict=True):
        assert f"95 % CI {c.low:+.2f} to {c.high:+.2f}" in sentence
        assert c.n == vit.N_SEEDS
    for method, final in VIT["final"].items():
        row = next(line for line in VIT["table"].splitlines() if line.startswith(method))
        assert f"{sum(final) / len(final):.2f} ±" in row


def test_the_notebook_shows_the_saved_vit_results():
    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code" and "vit_run = " in c.source)
    assert "fig-vit-decomposition" in cell.metadata.get("tags", [])
    assert any("image/png" in out.get("data", {}) for out in cell.outputs)
    printed = "".join(out.get("text", "") for out in cell.outputs)
    assert VIT["table"] in printed and VIT["validation_table"] in printed
    assert VIT["figure2"]["table"] in printed
    comparisons = {f"{c['a']} - {c['b']}": helpers.Comparison(**c) for c in VIT["comparisons"]}
    assert helpers.comparison_table(comparisons) in printed  # from the saved numbers
    flat = " ".join(printed.split())
    for sentence in VIT["figure2"]["conclusions"].values():
        assert " ".join(sentence.split()) in flat
