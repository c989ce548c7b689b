"""The notebook as a file: hygiene of the stored outputs, and the Colab-only first cell."""

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


def test_metadata_asks_colab_for_a_gpu_and_has_no_widget_state():
    assert NOTEBOOK.metadata.get("accelerator") == "GPU"
    assert "widgets" not in NOTEBOOK.metadata


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


def test_colab_cell_fetches_the_pinned_project_and_never_installs_torch(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    scope = colab.run_cell()
    clone = colab.calls[0]
    assert clone[:2] == ["git", "clone"] and scope["PROJECT_URL"] in clone
    assert clone[clone.index("--branch") + 1] == scope["PROJECT_REF"]
    assert colab.moved == [clone[-1]]
    assert not any("torch" in " ".join(map(str, cmd)) for cmd in colab.calls)


def test_colab_cell_is_safe_to_rerun_after_a_runtime_restart(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    colab.run_cell()
    colab.run_cell()  # a restart puts the kernel back in /content, next to project/
    assert len(colab.calls) == 1 and colab.moved == ["project", "project"]


@pytest.mark.parametrize(
    "error",
    [
        "Remote branch v9.9.9 not found in upstream origin",
        "could not read Username for 'https://github.com': No such device or address",
    ],
    ids=["missing tag", "missing repository"],
)
def test_colab_cell_explains_a_failed_fetch_in_one_line(monkeypatch, tmp_path, error):
    colab = FakeColab(monkeypatch, tmp_path, clone_error=error)
    with pytest.raises(RuntimeError) as raised:
        colab.run_cell()
    message = str(raised.value)
    assert "\n" not in message and error in message
    assert "Upload helpers.py" in message and "PROJECT_REF" in message
    assert colab.moved == []


def test_colab_cell_refuses_a_half_fetched_project(monkeypatch, tmp_path):
    colab = FakeColab(monkeypatch, tmp_path)
    (tmp_path / "project").mkdir()
    with pytest.raises(RuntimeError, match="delete it"):
        colab.run_cell()
    assert colab.calls == [] and colab.moved == []


def test_notebook_asks_for_the_helpers_of_its_own_release():
    scope = {}
    exec(colab_cell().source, scope)
    import helpers

    assert scope["PROJECT_REF"] == f"v{helpers.__version__}"
    assert "helpers.require_version(PROJECT_REF)" in CODE[1].source
    helpers.require_version(scope["PROJECT_REF"])
    with pytest.raises(ImportError, match="needs v0.0.1: put the helpers.py of release v0.0.1"):
        helpers.require_version("v0.0.1")


def test_the_test_command_runs_the_notebook_on_the_cpu(monkeypatch):
    """tests/conftest.py pins DORA_DEVICE=cpu; nbval's kernel inherits it and the notebook
    prints (compared) which device it runs on, so a GPU machine cannot slip into the test."""
    import os

    import helpers

    assert os.environ["DORA_DEVICE"] == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert helpers.pick_device().type == "cpu"
    device_cell = next(c for c in CODE if "helpers.pick_device()" in c.source)
    assert not ignored(device_cell)
    assert device_cell.outputs[0]["text"] == "device: cpu\n"


def test_readme_badge_points_at_the_notebook_constant():
    scope = {}
    exec(colab_cell().source, scope)
    url = scope["PROJECT_URL"].removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{url}/blob/"
    readme = (REPO / "README.md").read_text()
    intro = NOTEBOOK.cells[0].source
    for text in (readme, intro):
        assert badge in text
        refs = re.findall(re.escape(badge) + r"([^/]+)/DoRA\.ipynb", text)
        assert refs and set(refs) == {scope["PROJECT_REF"]}


def test_cells_that_print_timings_are_not_compared():
    timing = re.compile(r"\d+(\.\d+)? m?s\b|s / epoch|per forward")
    for cell in CODE:
        text = "".join(out.get("text", "") for out in cell.outputs)
        if timing.search(text):
            assert ignored(cell), cell.source[:200]


def test_notebook_is_already_clean_for_the_nbstripout_hook(tmp_path):
    """The committed notebook passes the pre-commit nbstripout hook unchanged (outputs kept)."""
    config = (REPO / ".pre-commit-config.yaml").read_text()
    entry = re.search(r"entry: (nbstripout .*)", config).group(1)
    copy = tmp_path / "DoRA.ipynb"
    copy.write_text((REPO / "DoRA.ipynb").read_text())
    args = shlex.split(entry)[1:]
    subprocess.run([sys.executable, "-m", "nbstripout", *args, str(copy)], check=True)
    assert nbformat.read(copy, as_version=4) == NOTEBOOK


def test_stored_stream_outputs_are_coalesced():
    """tools/run_notebook.py joins a cell's consecutive stdout chunks (stable diffs)."""
    for cell in CODE:
        for before, after in zip(cell.outputs, cell.outputs[1:], strict=False):
            both_streams = before.output_type == after.output_type == "stream"
            assert not (both_streams and before.name == after.name), cell.source[:200]


def test_table_of_contents_links_every_section_heading():
    """The first cell links each part ('# Part ...') and each '## ' section heading
    (JupyterLab's anchors: spaces become '-')."""
    headings = [
        line.lstrip("#").strip()
        for cell in NOTEBOOK.cells[1:]
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.startswith("## ") or line.startswith("# Part ")
    ]
    anchors = {heading.replace("`", "").replace(" ", "-") for heading in headings}
    links = re.findall(r"\]\(#([^)]+)\)", NOTEBOOK.cells[0].source)
    assert set(links) == anchors
    assert [h for h in headings if h.startswith("Part ")] == [
        "Part I. DoRA in thirty minutes",
        "Part II. The evidence",
        "Part III. DoRA in practice",
    ]


def part_one():
    """The cells from the top to the first heading that starts with 'Part II'."""
    end = next(
        i
        for i, c in enumerate(NOTEBOOK.cells)
        if c.cell_type == "markdown" and c.source.lstrip("# ").startswith("Part II")
    )
    return NOTEBOOK.cells[:end]


def markdown_words(text):
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)  # formulas do not count
    return len(re.sub(r"\$[^$]*\$", " ", text).split())


def test_part_one_is_a_thirty_minute_read():
    cells = part_one()
    words = sum(markdown_words(c.source) for c in cells if c.cell_type == "markdown")
    code = [c for c in cells if c.cell_type == "code"]
    assert words <= 2500 and len(code) <= 30, (words, len(code))


def class_lines(source, name):
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"class {name}("))
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ")), None)
    body = lines[start:end]
    return [line for line in body if line.strip() and not line.strip().startswith("#")]


def test_part_one_layers_are_the_idea_alone():
    """The first LoRA and DoRA classes: at most 15 and 20 lines of code, no caching, casting,
    dropout or argument checks; a figure comes before the first DoRA class; a plain loop
    (for, backward(), step()) runs in Part I."""
    cells = part_one()
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    lora = class_lines(code, "LoRALayer") + class_lines(code, "LinearWithLoRA")
    dora = class_lines(code, "LinearWithDoRA")
    assert (
        len(class_lines(code, "LinearWithLoRA")) <= 15 and len(class_lines(code, "LoRALayer")) <= 15
    )
    assert len(dora) <= 20, len(dora)
    for line in lora + dora:
        code_only = line.split("#")[0]
        for banned in ("cache", ".to(", "dropout", "check_", "dtype", "raise"):
            assert banned not in code_only, line
    first_dora = next(i for i, c in enumerate(cells) if "class LinearWithDoRA(" in c.source)
    assert any(
        "image/png" in out.get("data", {})
        for c in cells[:first_dora]
        if c.cell_type == "code"
        for out in c.outputs
    )
    loop = next(c for c in cells if c.cell_type == "code" and "def train_one_model(" in c.source)
    assert all(word in loop.source for word in ("for ", ".backward()", ".step()"))
    assert any("train_one_model(pretrained" in c.source for c in cells if c.cell_type == "code")


def test_the_colab_cell_is_collapsed_with_a_title():
    cell = CODE[0]
    assert cell.source.startswith("# @title ") or cell.source.startswith("#@title ")
    assert cell.metadata["jupyter"]["source_hidden"] is True
    assert cell.metadata["cellView"] == "form"


@pytest.mark.parametrize("failure", ["broken", "missing"])
def test_the_optional_peft_section_cannot_stop_the_notebook(monkeypatch, capsys, failure):
    """peft can be installed and still fail to import (with torch 2.5 and transformers 5 it
    raises NameError, not ImportError): the section says why and every PEFT cell is skipped."""
    import helpers

    if failure == "broken":
        broken = types.ModuleType("peft")

        def __getattr__(name):
            raise NameError("name 'nn' is not defined")

        broken.__getattr__ = __getattr__
        monkeypatch.setitem(sys.modules, "peft", broken)
    else:
        monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    importing = next(c for c in CODE if "from peft import" in c.source)
    scope = {"helpers": helpers}
    exec(importing.source, scope)
    said = capsys.readouterr().out
    assert scope["PeftModel"] is None
    assert said.startswith("Skipping the comparison with PEFT: cannot import peft")
    assert ("NameError" if failure == "broken" else "Error") in said
    users = [c for c in CODE if "PeftModel" in c.source and c is not importing]
    assert users and all("if PeftModel is not None" in c.source for c in users)
