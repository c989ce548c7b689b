"""Unit tests of tools/run_notebook.py and tools/check_determinism.py (no kernel started)."""

import base64
import re
from pathlib import Path

import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook, new_output

from dora_tutorial.notebook import coalesce_streams
from tools.check_determinism import cell_texts, sanitizers
from tools.run_notebook import REPO, RUNS, destinations, main, save_figures

PNG = base64.b64encode(b"\x89PNG fake").decode()


def stream(text, name="stdout"):
    return new_output("stream", name=name, text=text)


def test_coalesce_streams_joins_consecutive_chunks_of_one_stream():
    image = new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})
    outputs = [stream("a\n"), stream("b\n"), stream("!\n", "stderr"), image, stream("c\n")]
    merged = coalesce_streams(outputs)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in merged] == [
        ("stream", "stdout", "a\nb\n"),
        ("stream", "stderr", "!\n"),
        ("display_data", None, None),
        ("stream", "stdout", "c\n"),
    ]


def test_save_figures_writes_tagged_pngs_only(tmp_path):
    tagged = new_code_cell("plot()", metadata={"tags": ["fig-curves"]})
    tagged.outputs = [new_output("display_data", data={"image/png": PNG})]
    untagged = new_code_cell("plot()")
    untagged.outputs = [new_output("display_data", data={"image/png": PNG})]
    saved = save_figures(new_notebook(cells=[tagged, untagged]), tmp_path / "figures")
    assert saved == [tmp_path / "figures" / "curves.png"]
    assert saved[0].read_bytes() == b"\x89PNG fake"
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["curves.png"]


def test_sanitize_rules_mask_timings_but_not_results():
    rules = sanitizers()
    cell = new_code_cell("train()")
    cell.outputs = [stream("epoch 1: accuracy 93.55% (0.14 s)\nstep    6.5 ms (0.87 x base)\n")]
    other = new_code_cell("train()")
    other.outputs = [stream("epoch 1: accuracy 93.55% (1.20 s)\nstep   12.0 ms (1.02 x base)\n")]
    changed = new_code_cell("train()")
    changed.outputs = [stream("epoch 1: accuracy 93.56% (0.14 s)\nstep    6.5 ms (0.87 x base)\n")]
    texts = [cell_texts(new_notebook(cells=[c]), rules)[0] for c in (cell, other, changed)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    assert "93.55%" in texts[0]


def test_every_sanitize_rule_has_a_regex_and_a_non_empty_replacement():
    """nbval silently drops a rule whose `replace:` is empty (nbval 0.11: checked)."""
    text = Path(__file__).with_name("nbval_sanitize.cfg").read_text()
    rules = sanitizers()
    assert text.count("regex:") == text.count("replace:") == len(rules) >= 3
    for regex, replace in rules:
        assert re.compile(regex) and replace


NOTEBOOK = REPO / "DoRA.ipynb"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_readers_run_writes_runs_not_the_committed_files(device):
    """The README's first command leaves every tracked file as it was (runs/ is ignored)."""
    output, figures = destinations(NOTEBOOK, None, None, torch.device(device))
    assert (output, figures) == (RUNS / "DoRA.ipynb", RUNS / "figures")
    assert "runs/" in (REPO / ".gitignore").read_text().splitlines()


def test_only_a_cpu_run_may_write_the_committed_files():
    committed = (NOTEBOOK, REPO / "figures")
    assert destinations(NOTEBOOK, *committed, torch.device("cpu")) == committed
    assert destinations(NOTEBOOK, *committed, torch.device("cuda"))[0] is None


def test_regenerate_takes_no_other_destination(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["run_notebook", "--regenerate", "--output", "/tmp/x.ipynb"])
    with pytest.raises(SystemExit):
        main()
    assert "--regenerate writes the committed files" in capsys.readouterr().err
