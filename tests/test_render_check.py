"""tools/render_check.py, in JupyterLab and headless Chromium, names what a reader trips over."""

import json
import re
import subprocess
import sys

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools.render_check import CHROMEDRIVER, CHROMIUM, REPO

pytestmark = [pytest.mark.browser, pytest.mark.slow]
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs apt-get install chromium chromium-driver", allow_module_level=True)
PNG = {  # a valid 1 x 1 PNG
    "image/png": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8"
    "AAAAASUVORK5CYII="
}
NOT_PNG = {"image/png": "bm90IGEgcG5n"}  # "not a png"
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def render_check(tmp_path, cells, *args):
    path = tmp_path / "tiny.ipynb"
    path.write_text(text := json.dumps(new_notebook(cells=cells, metadata=KERNEL)))
    command = [sys.executable, "-m", "tools.render_check", "--notebook", str(path), *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert path.read_text() == text  # never written
    output = result.stdout + result.stderr
    return result.returncode, re.findall(r"^FAIL .*", output, re.M), output


def stream(text, name="stdout"):
    return new_output("stream", name=name, text=text)


def test_what_a_reader_trips_over_is_named_with_its_cell(tmp_path):
    wide = " + ".join(f"a_{{{i}}} b_{{{i}}}" for i in range(60))
    cells = [
        new_markdown_cell(f"A sum too long for any column:\n\n$$y = {wide}$$"),
        new_markdown_cell("A typo: $\\nosuchmacro{x}$, $$\\begin{nosuchenv} x \\end{nosuchenv}$$"),
        new_code_cell(outputs=[stream("short line\n" + "word " * 60 + "\n")]),
        new_code_cell(outputs=[stream("ok\n"), stream("UserWarning: x\n", "stderr")]),
        new_code_cell(outputs=[new_output("display_data", data=NOT_PNG)]),
        new_markdown_cell("Fine: $x^2$, $$V = W_0 + s\\,BA.$$ An unclosed formula: $x^{2}."),
    ]
    status, problems, output = render_check(tmp_path, cells, "--no-run")
    expected = [
        "FAIL cell 0: markdown overflow: math is ",
        "FAIL cell 1: MathJax error: undefined \\nosuchmacro",
        "FAIL cell 1: MathJax error: Unknown environment 'nosuchenv'",
        "FAIL cell 2: output line wraps: 2",
        "FAIL cell 3: stderr output (open): UserWarning: x",
        "FAIL cell 4: image did not load: data:image/png;base64,",
        "FAIL cell 5: TeX not typeset: ",
    ]
    assert status == 1 and len(problems) == len(expected), output
    assert all(p.startswith(e) for p, e in zip(problems, expected, strict=True)), output
    assert "$x^{2}." in problems[-1]


def test_a_clean_notebook_passes_and_leaves_screenshots(tmp_path):
    cells = [
        new_markdown_cell("# Title\n\n$$W'[n] = m_n \\frac{V[n]}{\\|V[n]\\|}$$"),
        new_code_cell(outputs=[stream("a short line\n"), new_output("display_data", data=PNG)]),
    ]
    status, _, output = render_check(tmp_path, cells, "--no-run", "--screenshots", tmp_path / "s")
    assert status == 0 and "render check: OK" in output, output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["open-end.png", "open-top.png"]


def test_run_all_reports_an_error_the_stored_outputs_do_not_show(tmp_path):
    cells = [
        new_code_cell("import sys\nprint('to stderr', file=sys.stderr)\nraise ValueError('boom')"),
        new_code_cell("print('never reached')"),
    ]
    status, problems, output = render_check(tmp_path, cells)
    assert status == 1 and "open: 0 problem(s)" in output, output
    assert problems == [
        "FAIL page: run-all stopped: 1 of 2 code cells ran",
        "FAIL cell 0: stderr output (run): to stderr",
        "FAIL cell 0: error output (run): ValueError: boom",
    ]
