"""The maintainers' tools and dora_tutorial/notebook.py, without a kernel."""

import base64
import traceback
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook, new_output

from dora_tutorial.notebook import coalesce_streams, import_notebook_definitions
from tools.check_determinism import cell_texts, sanitizers
from tools.floors import floor_pins
from tools.run_notebook import REPO, RUNS, destinations, main, save_figures

IMAGE = new_output("display_data", data={"image/png": base64.b64encode(b"PNG").decode()})
NOTEBOOK, FIGURES = REPO / "DoRA.ipynb", REPO / "figures"


def stream(text, name="stdout"):
    return new_output("stream", name=name, text=text)


def test_coalesce_streams_joins_consecutive_chunks_of_one_stream():
    outputs = [stream("a\n"), stream("b\n"), stream("!\n", "stderr"), IMAGE, stream("c\n")]
    assert [o.get("text") for o in coalesce_streams(outputs)] == ["a\nb\n", "!\n", None, "c\n"]


def test_save_figures_writes_tagged_pngs_only(tmp_path):
    cells = [new_code_cell("", metadata={"tags": t}, outputs=[IMAGE]) for t in (["fig-a"], [])]
    assert save_figures(new_notebook(cells=cells), tmp_path) == [tmp_path / "a.png"]
    assert [p.read_bytes() for p in tmp_path.iterdir()] == [b"PNG"]


def test_the_determinism_check_masks_timings_but_not_results():
    printed = [
        "epoch 1: accuracy 93.55% (0.14 s)\nstep    6.5 ms (0.87 x base) at 0x7f2b\n",
        "epoch 1: accuracy 93.55% (1.20 s)\nstep   12.0 ms (1.02 x base) at 0x7f3a\n",
        "epoch 1: accuracy 93.56% (0.14 s)\nstep    6.5 ms (0.87 x base) at 0x7f2b\n",
    ]
    cells = [new_code_cell("train()", outputs=[stream(text)]) for text in printed]
    stored, rerun, changed = cell_texts(new_notebook(cells=cells), sanitizers())
    assert stored == rerun != changed and "93.55%" in stored


@pytest.mark.parametrize(
    "device, asked, expected",
    [
        ("cpu", (None, None), (RUNS / "DoRA.ipynb", RUNS / "figures")),  # a reader's run
        ("cpu", (NOTEBOOK, FIGURES), (NOTEBOOK, FIGURES)),  # --regenerate
        ("cuda", (NOTEBOOK, FIGURES), (None, FIGURES)),  # refused
        ("cuda", (Path("/tmp/x.ipynb"), None), (Path("/tmp/x.ipynb"), Path("/tmp/x-figures"))),
    ],
)
def test_where_a_run_writes(device, asked, expected):
    assert destinations(NOTEBOOK, *asked, torch.device(device)) == expected


def test_regenerate_takes_no_other_destination(capsys):
    with pytest.raises(SystemExit):
        main(["--regenerate", "--output", "/tmp/x.ipynb"])
    assert "--regenerate writes the committed files" in capsys.readouterr().err


def test_a_traceback_names_the_notebook_cell_and_shows_its_line():
    nb = import_notebook_definitions(NOTEBOOK, name="dora_notebook_traceback")
    with pytest.raises(ValueError) as info:
        nb.LoRALinear(torch.nn.Linear(3, 2), rank=0, alpha=1)
    frame = [f for f in traceback.extract_tb(info.tb) if "[cell " in f.filename][-1]
    number = int(frame.filename.removeprefix("DoRA.ipynb[cell ").rstrip("]"))
    source = nbformat.read(NOTEBOOK, as_version=4).cells[number - 1].source
    assert frame.line and frame.line in source


@pytest.mark.parametrize(
    "line, pin",
    [
        ("torch>=2.6.0  # why", "torch==2.6.0"),
        ("Huggingface_Hub >= 0.25.0, <3", "Huggingface_Hub==0.25.0"),  # the upper bound dropped
        ("ruff==0.17.6", "ruff==0.17.6"),  # a pin is its own floor
    ],
)
def test_a_floor_becomes_an_exact_pin(line, pin):
    assert floor_pins(["# note", "", "-r requirements.txt", line]) == [pin]


def test_overrides_replace_the_pin_of_the_package_they_name():
    pins = floor_pins(["torch>=2.6", "huggingface_hub>=0.25"], ["huggingface-hub==0.3", "six==1"])
    assert pins == ["torch==2.6", "huggingface-hub==0.3", "six==1"]
    with pytest.raises(ValueError):
        floor_pins(["torch>=2.6"], ["torch"])  # an override without a version


@pytest.mark.parametrize(
    "line", ["torch", "torch<3", "torch>=2.6,>=2.7", "torch[cuda]>=2.6", "torch>=2.6; os_name"]
)
def test_a_requirement_without_one_plain_floor_is_refused(line):
    with pytest.raises(ValueError):
        floor_pins([line])


def test_the_requirements_files_have_their_floors():
    files = [REPO / "requirements.txt", REPO / "requirements-dev.txt"]
    lines = [line.split("#")[0].strip() for file in files for line in file.read_text().splitlines()]
    assert len(floor_pins(lines)) == len([line for line in lines if line and line[:3] != "-r "])
