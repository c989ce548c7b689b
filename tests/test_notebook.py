"""The notebook as a file: hygiene of the stored outputs, and the Colab-only first cell."""

import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
CODE = [cell for cell in NOTEBOOK.cells if cell.cell_type == "code"]


def ignored(cell):
    """Whether nbval leaves the cell's output alone (its tag; a learner never sees it)."""
    return "nbval-ignore-output" in cell.metadata.get("tags", [])


def test_stored_outputs_come_from_one_top_to_bottom_run():
    assert [cell.execution_count for cell in CODE] == list(range(1, len(CODE) + 1))
    for cell in CODE:
        for out in cell.outputs:
            assert out.output_type != "error", cell.source
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {})
            text = out.get("text", "") + out.get("data", {}).get("text/plain", "")
            assert "cuda" not in text.lower() or ignored(cell)
        for before, after in zip(cell.outputs, cell.outputs[1:], strict=False):
            # tools/run_notebook.py joins consecutive chunks of one stream: stable diffs
            assert not (before.output_type == after.output_type == "stream")


def test_metadata_asks_colab_for_a_gpu_and_collapses_the_colab_cell():
    assert NOTEBOOK.metadata.get("accelerator") == "GPU"
    assert "widgets" not in NOTEBOOK.metadata
    assert CODE[0].source.startswith("# @title ")
    assert CODE[0].metadata["jupyter"]["source_hidden"] is True
    assert CODE[0].metadata["cellView"] == "form"


def test_each_tagged_figure_is_stored_and_exported():
    for cell in CODE:
        for tag in cell.metadata.get("tags", []):
            if tag.startswith("fig-"):
                assert any("image/png" in out.get("data", {}) for out in cell.outputs), tag
                assert (REPO / "figures" / f"{tag[4:]}.png").is_file(), tag


def colab_cell():
    cell = CODE[0]
    assert "google.colab" in cell.source
    return cell


def test_colab_cell_does_nothing_elsewhere(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    exec(colab_cell().source, {})
    assert calls == [] and capsys.readouterr().out == ""
    assert colab_cell().outputs == []


class FakeColab:
    """A Colab machine for the first cell: ``google.colab`` importable, an empty /content, and a
    ``git clone`` that succeeds (writing project/helpers.py) or fails as git does."""

    def __init__(self, monkeypatch, tmp_path, clone_error=None):
        self.calls, self.moved, self.error = [], [], clone_error
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        monkeypatch.chdir(tmp_path)  # no helpers.py here, as on a fresh Colab machine
        monkeypatch.setattr(subprocess, "run", self.run)
        monkeypatch.setattr("os.chdir", self.moved.append)

    def run(self, cmd, **kwargs):
        self.calls.append(cmd)
        if self.error:
            return subprocess.CompletedProcess(cmd, 128, "", f"Cloning...\nfatal: {self.error}\n")
        (Path(cmd[-1]) / "helpers.py").parent.mkdir()
        (Path(cmd[-1]) / "helpers.py").write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def run_cell(self):
        scope = {}
        exec(colab_cell().source, scope)
        return scope


def test_colab_cell_fetches_the_pinned_project_once(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    scope = colab.run_cell()
    clone = colab.calls[0]
    assert clone[:2] == ["git", "clone"] and scope["PROJECT_URL"] in clone
    assert clone[clone.index("--branch") + 1] == scope["PROJECT_REF"]
    assert not any("torch" in " ".join(map(str, cmd)) for cmd in colab.calls)
    colab.run_cell()  # a runtime restart puts the kernel back in /content, next to project/
    assert len(colab.calls) == 1 and colab.moved == ["project", "project"]


@pytest.mark.parametrize(
    "error",
    [
        "Remote branch v9.9.9 not found in upstream origin",
        "could not read Username for 'https://github.com': No such device or address",
        None,  # a folder project/ without helpers.py: an interrupted download
    ],
    ids=["missing tag", "missing repository", "half-fetched"],
)
def test_colab_cell_explains_a_failed_fetch_in_one_line(monkeypatch, tmp_path, error):
    colab = FakeColab(monkeypatch, tmp_path, clone_error=error)
    if error is None:
        (tmp_path / "project").mkdir()
    with pytest.raises(RuntimeError) as raised:
        colab.run_cell()
    message = str(raised.value)
    assert "\n" not in message and colab.moved == []
    if error is None:
        assert "delete it" in message and colab.calls == []
    else:
        assert error in message and "Upload helpers.py" in message and "PROJECT_REF" in message


def test_notebook_asks_for_the_helpers_of_its_own_release():
    scope = {}
    exec(colab_cell().source, scope)
    import helpers

    assert scope["PROJECT_REF"] == f"v{helpers.__version__}"
    helpers.require_version(scope["PROJECT_REF"])
    with pytest.raises(ImportError, match="needs v0.0.1: put the helpers.py of release v0.0.1"):
        helpers.require_version("v0.0.1")
    url = scope["PROJECT_URL"].removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{url}/blob/"
    for text in ((REPO / "README.md").read_text(), NOTEBOOK.cells[0].source):
        refs = re.findall(re.escape(badge) + r"([^/]+)/DoRA\.ipynb", text)
        assert refs and set(refs) == {scope["PROJECT_REF"]}


def test_the_test_command_runs_the_notebook_on_the_cpu(monkeypatch):
    """tests/conftest.py pins DORA_DEVICE=cpu; nbval's kernel inherits it and the notebook
    prints (compared) which device it runs on, so a GPU machine cannot slip into the test."""
    import helpers

    assert os.environ["DORA_DEVICE"] == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert helpers.pick_device().type == "cpu"
    outputs = [out.get("text") for cell in CODE if not ignored(cell) for out in cell.outputs]
    assert "device: cpu\n" in outputs


def test_cells_that_print_timings_are_not_compared():
    timing = re.compile(r"\d+(\.\d+)? m?s\b|s / epoch|per forward")
    for cell in CODE:
        text = "".join(out.get("text", "") for out in cell.outputs)
        if timing.search(text):
            assert ignored(cell), cell.source[:200]


def test_notebook_is_already_clean_for_the_nbstripout_hook(tmp_path):
    """The committed notebook passes the pre-commit nbstripout hook unchanged (outputs kept)."""
    config = (REPO / ".pre-commit-config.yaml").read_text()
    args = shlex.split(re.search(r"entry: (nbstripout .*)", config).group(1))[1:]
    copy = tmp_path / "DoRA.ipynb"
    copy.write_text((REPO / "DoRA.ipynb").read_text())
    subprocess.run([sys.executable, "-m", "nbstripout", *args, str(copy)], check=True)
    assert nbformat.read(copy, as_version=4) == NOTEBOOK


def test_table_of_contents_links_every_section_heading():
    """The first cell links each part and each section (JupyterLab's anchors: '-' for ' ')."""
    headings = [
        line.lstrip("#").strip()
        for cell in NOTEBOOK.cells[1:]
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith(("## ", "# Part "))
    ]
    links = re.findall(r"\]\(#([^)]+)\)", NOTEBOOK.cells[0].source)
    assert set(links) == {heading.replace("`", "").replace(" ", "-") for heading in headings}
    assert [h for h in headings if h.startswith("Part ")] == [
        "Part I. DoRA in thirty minutes",
        "Part II. The evidence",
        "Part III. DoRA in practice",
    ]


def markdown_words(cells):
    text = " ".join(c.source for c in cells if c.cell_type == "markdown")
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)  # formulas do not count
    return len(re.sub(r"\$[^$]*\$", " ", text).split())


def test_the_lesson_keeps_its_size():
    """Part I a thirty-minute read; the whole notebook at most 45 code cells of at most 30 lines."""
    part_two = next(i for i, c in enumerate(NOTEBOOK.cells) if c.source.startswith("# Part II"))
    part_one = NOTEBOOK.cells[:part_two]
    assert markdown_words(part_one) <= 2500
    assert sum(c.cell_type == "code" for c in part_one) <= 30
    assert len(CODE) <= 45
    assert max(len(cell.source.splitlines()) for cell in CODE) <= 30


@pytest.mark.parametrize("failure", ["broken", "missing"])
def test_the_optional_peft_section_cannot_stop_the_notebook(monkeypatch, capsys, failure):
    """peft can be installed and still fail to import (with torch 2.5 and transformers 5 it
    raises NameError, not ImportError): the notebook is told why and goes on without it."""
    import helpers

    if failure == "broken":
        broken = types.ModuleType("peft")

        def __getattr__(name):
            raise NameError("name 'nn' is not defined")

        broken.__getattr__ = __getattr__
        monkeypatch.setitem(sys.modules, "peft", broken)
    else:
        monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert helpers.import_peft() is None
    said = capsys.readouterr().out
    assert said.startswith("Skipping the comparison with PEFT: cannot import peft")
    assert ("NameError" if failure == "broken" else "Error") in said
