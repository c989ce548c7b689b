"""tools/run_notebook.py, tools/check_determinism.py and dora_tutorial/notebook.py, without a
kernel: where a run writes, which figures it saves, what the determinism check masks, streams
joined as Jupyter shows them, and tracebacks that name the notebook's cell."""

import base64
import re
import traceback
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook, new_output

import helpers
from dora_tutorial.notebook import coalesce_streams, import_notebook_definitions
from tools.check_determinism import cell_texts, sanitizers
from tools.run_notebook import REPO, RUNS, destinations, main, save_figures

PNG = base64.b64encode(b"\x89PNG fake").decode()
NOTEBOOK, FIGURES = REPO / "DoRA.ipynb", REPO / "figures"


def stream(text, name="stdout"):
    return new_output("stream", name=name, text=text)


def test_coalesce_streams_joins_consecutive_chunks_of_one_stream():
    image = new_output("display_data", data={"image/png": PNG})
    merged = coalesce_streams(
        [stream("a\n"), stream("b\n"), stream("!\n", "stderr"), image, stream("c\n")]
    )
    assert [(o.output_type, o.get("text")) for o in merged] == [
        ("stream", "a\nb\n"),
        ("stream", "!\n"),
        ("display_data", None),
        ("stream", "c\n"),
    ]


def test_save_figures_writes_tagged_pngs_only(tmp_path):
    cells = [new_code_cell("plot()", metadata={"tags": tags}) for tags in (["fig-curves"], [])]
    for cell in cells:
        cell.outputs = [new_output("display_data", data={"image/png": PNG})]
    assert save_figures(new_notebook(cells=cells), tmp_path) == [tmp_path / "curves.png"]
    assert [p.read_bytes() for p in tmp_path.iterdir()] == [b"\x89PNG fake"]


@pytest.mark.parametrize(
    "text, same",
    [
        ("epoch 1: accuracy 93.55% (1.20 s)\nstep   12.0 ms (1.02 x base)\n", True),
        ("epoch 1: accuracy 93.56% (0.14 s)\nstep    6.5 ms (0.87 x base)\n", False),
    ],
)
def test_the_determinism_check_masks_timings_but_not_results(text, same):
    rules = sanitizers()
    assert rules and all(
        re.compile(regex) and replace for regex, replace in rules
    )  # nbval drops an empty one
    texts = []
    for printed in ("epoch 1: accuracy 93.55% (0.14 s)\nstep    6.5 ms (0.87 x base)\n", text):
        cell = new_code_cell("train()")
        cell.outputs = [stream(printed)]
        texts += cell_texts(new_notebook(cells=[cell]), rules)
    assert (texts[0] == texts[1]) == same and "93.55%" in texts[0]


@pytest.mark.parametrize(
    "device, asked, expected",
    [
        ("cpu", (None, None), (RUNS / "DoRA.ipynb", RUNS / "figures")),  # a reader's run
        ("cuda", (None, None), (RUNS / "DoRA.ipynb", RUNS / "figures")),
        ("cpu", (NOTEBOOK, FIGURES), (NOTEBOOK, FIGURES)),  # --regenerate
        ("cuda", (NOTEBOOK, FIGURES), (None, FIGURES)),  # refused
        ("cuda", (Path("/tmp/x.ipynb"), None), (Path("/tmp/x.ipynb"), Path("/tmp/x-figures"))),
    ],
)
def test_where_a_run_writes(device, asked, expected):
    assert destinations(NOTEBOOK, *asked, torch.device(device)) == expected


def test_regenerate_takes_no_other_destination(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["run_notebook", "--regenerate", "--output", "/tmp/x.ipynb"])
    with pytest.raises(SystemExit):
        main()
    assert "--regenerate writes the committed files" in capsys.readouterr().err


def test_helpers_exports_what_it_names():
    assert all(hasattr(helpers, name) for name in helpers.__all__)


def test_a_traceback_names_the_notebook_cell_and_shows_its_line():
    nb = import_notebook_definitions(NOTEBOOK, name="dora_notebook_traceback")
    with pytest.raises(ValueError) as info:
        nb.LoRALinear(torch.nn.Linear(3, 2), rank=0, alpha=1)
    frame = [f for f in traceback.extract_tb(info.value.__traceback__) if "[cell " in f.filename][
        -1
    ]
    number = int(frame.filename.removeprefix("DoRA.ipynb[cell ").rstrip("]"))
    assert (
        frame.line and frame.line in nbformat.read(NOTEBOOK, as_version=4).cells[number - 1].source
    )
