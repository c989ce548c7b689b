"""tools/render_check.py against tiny notebooks: it must name what a reader would trip over.
Each test starts JupyterLab and headless Chromium; skipped without Debian's chromium."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools.render_check import CHROMEDRIVER, CHROMIUM

TOOLS = Path(__file__).resolve().parents[1] / "tools"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
    ),
]

# a valid 1 x 1 PNG
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def render_check(tmp_path, cells, *args):
    path = tmp_path / "tiny.ipynb"
    path.write_text(json.dumps(new_notebook(cells=cells, metadata=KERNEL)))
    before = path.read_bytes()
    result = subprocess.run(
        [sys.executable, str(TOOLS / "render_check.py"), "--notebook", str(path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert path.read_bytes() == before  # never written back
    return result.returncode, result.stdout + result.stderr


def fails(output):
    return [line for line in output.splitlines() if line.startswith("FAIL ")]


def stdout(text):
    return new_output("stream", name="stdout", text=text)


def test_what_a_reader_trips_over_is_named_with_its_cell(tmp_path):
    wide = " + ".join(f"a_{{{i}}} b_{{{i}}}" for i in range(60))
    printed, warned, broken = (new_code_cell("...") for _ in range(3))
    printed.outputs = [stdout("short line\n" + "word " * 60 + "\n")]
    warned.outputs = [stdout("ok\n"), new_output("stream", name="stderr", text="UserWarning: x\n")]
    not_png = base64.b64encode(b"not a png").decode()
    broken.outputs = [new_output("display_data", data={"image/png": not_png, "text/plain": "<F>"})]
    cells = [
        new_markdown_cell(f"A sum too long for any column:\n\n$$y = {wide}$$"),
        new_markdown_cell(
            "A typo: $\\nosuchmacro{x}$, and $$\\begin{nosuchenv} x \\end{nosuchenv}$$"
        ),
        printed,
        warned,
        broken,
        new_markdown_cell("Fine: $x^2$, $$V = W_0 + s\\,BA.$$ An unclosed formula: $x^{2}."),
    ]
    code, output = render_check(tmp_path, cells, "--no-run")
    problems = fails(output)
    assert code == 1 and [p.split(":")[0] for p in problems] == [
        f"FAIL cell {i}" for i in (0, 1, 1, 2, 3, 4, 5)
    ], output
    expected = [
        (
            "markdown overflow: display math is ",
            "px wide in a",
            "(formula 1: y = a_{0} b_{0}",
            "horizontal scrollbar on the markdown area",
        ),
        ("MathJax error: Unknown environment 'nosuchenv'",),
        ("MathJax error: undefined control sequence \\nosuchmacro (shown in red)",),
        ("output line wraps: line 2 (300 chars)",),
        ("stderr output (open): UserWarning: x",),
        ("image did not load",),
        ("TeX not typeset", "$x^{2}."),
    ]
    for problem, parts in zip(problems, expected, strict=True):
        assert all(part in problem for part in parts), problem


def test_a_clean_notebook_passes_and_leaves_screenshots(tmp_path):
    figure = new_code_cell("plot()")
    figure.outputs = [
        stdout("a short line\n"),
        new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"}),
    ]
    cells = [
        new_markdown_cell(
            "# Title\n\n## 2. Section two\n\n$$W'[n] = m_n \\frac{V[n]}{\\|V[n]\\|}$$"
        ),
        figure,
        new_markdown_cell("The results table: none here."),
    ]
    shots = tmp_path / "shots"
    code, output = render_check(tmp_path, cells, "--no-run", "--screenshots", str(shots))
    assert code == 0 and "render check: OK" in output, output
    assert sorted(p.name for p in shots.iterdir()) == [
        "open-01-top.png",
        "open-02-section-2.png",
        "open-03-results-table.png",
        "open-04-end.png",
    ]


def test_run_all_reports_an_error_the_stored_outputs_do_not_show(tmp_path):
    cells = [
        new_markdown_cell("Runs cleanly as stored, not when run."),
        new_code_cell("import sys\nprint('to stderr', file=sys.stderr)\nraise ValueError('boom')"),
        new_code_cell("print('never reached')"),
    ]
    code, output = render_check(tmp_path, cells)
    assert code == 1 and "open: no problems" in output, output
    assert fails(output) == [
        "FAIL page: run-all stopped: 1 of 2 code cells ran; the rest did not",
        "FAIL cell 1: error output (run): ValueError: boom",
        "FAIL cell 1: stderr output (run): to stderr",
    ]
