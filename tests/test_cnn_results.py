"""experiments/cnn.json and vit.json alike: run with the notebook's settings, each rate the best
on the validation split and inside its grid, each verdict what its interval says, and the
notebook shows them as saved. The ViT's own checks are in tests/test_vit_results.py."""

import json

import nbformat
import pytest

import helpers
from dora_tutorial.notebook import protocol
from experiments import vit

REPO = helpers.REPO
SAVED = {
    name: json.loads((REPO / "experiments" / f"{name}.json").read_text()) for name in ("cnn", "vit")
}


@pytest.mark.parametrize("name, keys", [("cnn", None), ("vit", vit.USED)])  # None: all it has
def test_ran_with_the_notebooks_settings(nb, name, keys):
    settings = protocol(nb)
    assert SAVED[name]["protocol"] == {key: settings[key] for key in keys or settings}, (
        f"rerun experiments/{name}.py: the notebook's settings changed"
    )


@pytest.mark.parametrize("name", SAVED)
@pytest.mark.parametrize("method", ["full FT", "LoRA", "DoRA"])
def test_the_chosen_rate_is_the_best_on_validation_and_inside_its_grid(name, method):
    scores = {float(lr): mean for lr, (mean, _) in SAVED[name]["validation"][method].items()}
    chosen = SAVED[name]["chosen"][method]
    assert scores[chosen] == max(scores.values())
    assert min(scores) < chosen < max(scores), f"{chosen} at the grid's edge"


@pytest.mark.parametrize("name, n_seeds", [("cnn", None), ("vit", vit.N_SEEDS)])  # None: all
def test_each_verdict_is_what_its_paired_interval_says(nb, name, n_seeds):
    seeds = len(protocol(nb)["SEEDS"][:n_seeds])
    for saved, sentence in zip(SAVED[name]["comparisons"], SAVED[name]["sentences"], strict=True):
        c = helpers.Comparison(**saved)
        assert c.test == "paired t-test" and c.n == seeds
        if c.low <= 0 <= c.high:
            assert "no difference detected" in sentence
        else:
            side = "ahead of" if c.low > 0 else "behind"
            assert sentence.startswith(f"{c.a} is {side} {c.b}")


@pytest.mark.parametrize(
    "name, source", [("cnn", 'open("experiments/cnn.json")'), ("vit", "vit_run = ")]
)
def test_the_notebook_shows_the_saved_results(name, source):
    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code" and source in c.source)
    printed = "".join(out.get("text", "") for out in cell.outputs)
    saved = SAVED[name]
    comparisons = {f"{c['a']} - {c['b']}": helpers.Comparison(**c) for c in saved["comparisons"]}
    tables = [saved["table"], saved["validation_table"]]
    words = [c.sentence() for c in comparisons.values()]  # worded now, from the saved numbers
    if name == "vit":
        tables += [saved["figure2"]["table"], helpers.comparison_table(comparisons)]
        words = list(saved["figure2"]["conclusions"].values())
    assert all(table in printed for table in tables)
    assert all(" ".join(w.split()) in " ".join(printed.split()) for w in words)
    drawn = any("image/png" in out.get("data", {}) for out in cell.outputs)
    assert drawn == (name == "vit")
