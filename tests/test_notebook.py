"""The notebook as a file: hygiene of the stored outputs, and the Colab-only first cell."""

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
CODE = [cell for cell in NOTEBOOK.cells if cell.cell_type == "code"]


def test_stored_outputs_come_from_one_top_to_bottom_run():
    assert [cell.execution_count for cell in CODE] == list(range(1, len(CODE) + 1))
    for cell in CODE:
        for out in cell.outputs:
            assert out.output_type != "error", cell.source
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {})
            text = out.get("text", "") + out.get("data", {}).get("text/plain", "")
            assert "cuda" not in text.lower() or "NBVAL_IGNORE_OUTPUT" in cell.source


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


def test_colab_cell_fetches_the_pinned_project_and_never_installs_torch(monkeypatch, tmp_path):
    calls, moved = [], []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path)  # no helpers.py here, as on a fresh Colab machine
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd))
    monkeypatch.setattr("os.chdir", moved.append)
    scope = {}
    exec(colab_cell().source, scope)
    clone = calls[0]
    assert clone[:2] == ["git", "clone"] and scope["PROJECT_URL"] in clone
    assert clone[clone.index("--branch") + 1] == scope["PROJECT_REF"]
    assert moved == [clone[-1]]
    assert not any("torch" in " ".join(map(str, cmd)) for cmd in calls)


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
            assert "NBVAL_IGNORE_OUTPUT" in cell.source, cell.source[:200]


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
