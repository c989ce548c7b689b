"""What a reader sees in JupyterLab: open the notebook in headless Chromium and check the page.

    .venv/bin/python -m tools.render_check [--no-run] [--screenshots DIR] [--notebook PATH]

Exit status 1 on an element wider than its column, an output line that wraps, a MathJax error or
untypeset TeX, an image that did not load, an error or stderr output: as stored, then after
Restart Kernel and Run All (unless --no-run). Only 127.0.0.1 is reached; the file is not written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the DOM
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/apputils-extension/sessionDialogs": {"skipKernelRestartDialog": True},
}
_CHROMIUM_FLAGS = (
    "--headless=new --no-sandbox --disable-dev-shm-usage --disable-gpu --disable-extensions "
    "--disable-background-networking --disable-component-update --disable-sync --no-pings "
    "--no-first-run --window-size=1400,1000"
).split() + ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # only 127.0.0.1

_JS_PRELUDE = """
const app = window.jupyterapp;  // prepended to every script; NB(path): the notebook's panel
const NB = path => (app && app.shell && [...app.shell.widgets('main')].find(
  w => w.context && w.context.path === path && w.content && w.content.widgets)) || null;
"""
_JS_STATE = """
const w = NB(arguments[0]);
if (!w) return null;
const nb = w.content, code = nb.widgets.filter(c => c.model.type === 'code');
return {
  cells: nb.widgets.length,
  settled: document.fonts.status === 'loaded' &&
    [...nb.node.querySelectorAll('img')].every(i => i.complete) &&
    nb.node.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown').length >=
    nb.widgets.filter(c => c.model.type === 'markdown').length,
  nodes: nb.node.getElementsByTagName('*').length,  // still changing while MathJax works
  kernel: w.sessionContext.session?.kernel?.status ?? 'none',
  running: code.filter(c => c.model.executionState === 'running').length,
  counted: code.filter(c => c.model.executionCount !== null).length,
  runnable: code.filter(c => c.model.sharedModel.getSource().trim() !== '').length,
  started: window.__renderCheckStarted || 0,
  dialog: [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent.slice(0, 120)),
};
"""
# One pass over the cells, one line per problem. Inside a formula only its container counts
# (italic glyphs overhang a pixel by design); MathJax's hidden copy for screen readers is taken
# out of the layout first.
_JS_PROBLEMS = r"""
const nb = NB(arguments[0]).content, phase = arguments[1], problems = [];
const style = document.head.appendChild(document.createElement('style'));
style.textContent = 'mjx-assistive-mml { display: none !important; }';
const describe = el => (el.tagName === 'MJX-CONTAINER' ? 'math' : el.tagName.toLowerCase());
const clip = (text, n) => (text.length <= n ? text : text.slice(0, n - 3) + '...');
nb.widgets.forEach((cell, index) => {
  const fail = (kind, detail) => problems.push(`FAIL cell ${index}: ${kind}: ${detail}`);
  const all = selector => [...cell.node.querySelectorAll(selector)];
  const wide = all('.jp-RenderedMarkdown, .jp-RenderedMarkdown *, .jp-OutputArea-output, ' +
    '.jp-OutputArea-output *').filter(el => el.clientWidth > 0 &&
    el.scrollWidth > el.clientWidth && !el.parentElement.closest('mjx-container'));
  for (const el of wide)  // the innermost only: its ancestors overflow because of it
    if (!wide.some(o => o !== el && el.contains(o)))
      fail(`${cell.model.type} overflow`, `${describe(el)} is ${el.scrollWidth} px wide in a ` +
        `${el.clientWidth} px column: ${clip(el.textContent.replace(/\s+/g, ' ').trim(), 60)}`);
  for (const pre of all('.jp-OutputArea-output pre')) {
    pre.style.whiteSpace = 'pre';  // the printed lines unwrapped
    const longest = pre.textContent.split('\n').reduce((a, b) => (b.length > a.length ? b : a));
    if (pre.scrollWidth > pre.clientWidth) fail('output line wraps', `${pre.scrollWidth} px ` +
      `wide in a ${pre.clientWidth} px column: ${clip(longest, 70)}`);
    pre.style.whiteSpace = '';
  }
  for (const e of all('mjx-merror, mjx-assistive-mml mtext[mathcolor="red"]'))  // red: a typo
    if (e.tagName === 'MJX-MERROR' || e.textContent.startsWith('\\'))
      fail('MathJax error', e.getAttribute('data-mjx-error') || `undefined ${e.textContent}`);
  for (const md of all('.jp-RenderedMarkdown')) {  // its text outside code and formulas
    const text = md.cloneNode(true);
    text.querySelectorAll('code, pre, mjx-container').forEach(e => e.remove());
    const m = text.textContent.match(/\$\$|\\\(|\\\[|\\begin\{|\$[^$\s][^$]*[\\^_{}]/);
    if (m) fail('TeX not typeset', text.textContent.slice(Math.max(0, m.index - 20), m.index + 40));
  }
  for (const img of all('img:not([src*="colab-badge"])'))  // the badge needs the internet
    if (!(img.complete && img.naturalWidth > 0))
      fail('image did not load', clip(img.getAttribute('src') || '', 60));
  for (const out of cell.model.type === 'code' ? cell.model.outputs.toJSON() : [])
    if (out.output_type === 'error')
      fail(`error output (${phase})`, out.ename + ': ' + String(out.evalue).split('\n')[0]);
    else if (out.name === 'stderr')
      fail(`stderr output (${phase})`, [out.text].flat().join('').trim().split('\n')[0]);
});
style.remove();
for (const d of document.querySelectorAll('.jp-Dialog'))  // e.g. "the kernel has died"
  problems.push(`FAIL page: dialog: ${clip(d.textContent, 120)}`);
return problems;
"""
# Count the cells the kernel starts, then Kernel > Restart Kernel and Run All.
_JS_RUN_ALL = """
window.__renderCheckStarted = 0;
NB(arguments[0]).sessionContext.iopubMessage.connect((_, msg) => {
  if (msg.header.msg_type === 'execute_input') window.__renderCheckStarted += 1;
});
app.commands.execute('notebook:restart-run-all');
"""
_JS_SCROLL = "NB(arguments[0]).content.widgets.at(arguments[1]).node.scrollIntoView(!arguments[1]);"


def _js(driver, script: str, *args):
    return driver.execute_script(_JS_PRELUDE + script, *args)


@contextlib.contextmanager
def _jupyterlab(root: Path, home: Path, log_path: Path):
    """A JupyterLab server on 127.0.0.1 with throw-away settings; yields its URL and token."""
    for plugin, values in _SETTINGS.items():
        (home / "settings" / plugin).parent.mkdir(parents=True, exist_ok=True)
        (home / "settings" / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    skip = ("JUPYTER", "JPY_", "IPYTHONDIR", "MPLCONFIGDIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env |= {f"JUPYTER_{d.upper()}_DIR": str(home / d) for d in ("config", "data", "runtime")}
    env |= {
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_TOKEN": secrets.token_hex(24),  # not on the command line, where `ps` shows it
        "HOME": str(home),  # IPython's and Matplotlib's settings too
        "DORA_DEVICE": "cpu",
        "DORA_RESULTS": str(home / "results.json"),  # Run All must not touch figures/
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # else the debugger warns on stderr
    }
    lab = {  # throw-away settings, and window.jupyterapp for the scripts
        "extension_manager": "readonly",
        "user_settings_dir": home / "settings",
        "workspaces_dir": home / "ws",
        "expose_app_in_browser": True,
    }
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0"]
    command += ["--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", "--allow-root"]
    command += [f"--LabApp.{key}={value}" for key, value in lab.items()]
    with open(log_path, "wb") as log:  # its own session: kernels and all stop together
        io = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
        server = subprocess.Popen(command, cwd=root, env=env, start_new_session=True, **io)
    try:
        info = home / "runtime" / f"jpserver-{server.pid}.json"  # its port, bound soon after
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(ValueError, OSError):
                port = int(json.loads(info.read_text())["port"])
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            time.sleep(0.3)
        else:
            raise RuntimeError("JupyterLab did not start in 90 s")
        yield f"http://127.0.0.1:{port}/", env["JUPYTER_TOKEN"]
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):  # SIGTERM stops kernels
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=wait)
                break


@contextlib.contextmanager
def _chromium(profile: Path):
    os.environ["SE_OFFLINE"] = "true"  # selenium must never fetch a browser or a driver
    for key in ("NO_PROXY", "no_proxy"):  # selenium talks to chromedriver on 127.0.0.1
        os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with socket.socket() as refuser:
        refuser.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        proxy = f"--proxy-server=http://127.0.0.1:{refuser.getsockname()[1]}"
        for flag in [*_CHROMIUM_FLAGS, proxy, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_script_timeout(60)
            yield driver
        finally:
            driver.quit()


def _wait(driver, path: str, ready, what: str, polls: int = 1, timeout: float = 120) -> dict:
    """Poll the page until ``ready(state)`` holds with the same state ``polls`` times in a row."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        state = _js(driver, _JS_STATE, path)
        seen = [*seen, state][-polls:] if state and ready(state) else []
        if len(seen) == polls and all(s == state for s in seen):
            return state
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last state: {state})")


def _check_page(driver, path: str, phase: str, shots: Path | None) -> list[str]:
    """The page's problems once it has settled; screenshots of its top and end into ``shots``."""
    _wait(driver, path, lambda s: s["settled"], "a settled page", polls=6)
    problems = _js(driver, _JS_PROBLEMS, path, phase)
    print(f"{phase}: {len(problems)} problem(s)")
    for name, index in [("top", 0), ("end", -1)] if shots else []:
        _js(driver, _JS_SCROLL, path, index)
        time.sleep(0.4)
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / f"{phase}-{name}.png"))
    return problems


def _run_all(driver, path: str) -> list[str]:
    """Kernel > Restart Kernel and Run All, as a reader does; wait until no cell runs."""
    _wait(driver, path, lambda s: s["kernel"] == "idle", "an idle kernel")
    _js(driver, _JS_RUN_ALL, path)

    def done(s):  # Run All queues every cell: each is "running" until its reply comes
        return s["dialog"] or (s["started"] and s["running"] == 0 and s["kernel"] == "idle")

    state = _wait(driver, path, done, "the end of Run All", polls=6, timeout=1800)
    ran = f"{state['counted']} of {state['runnable']} code cells ran"
    return [f"FAIL page: run-all stopped: {ran}"] if state["counted"] < state["runnable"] else []


def check(notebook_path: Path, run: bool = True, shots: Path | None = None) -> list[str]:
    """Open the notebook in JupyterLab, check it, run it (unless ``run=False``), check again."""
    notebook_path = notebook_path.resolve()
    root, path = notebook_path.parent, notebook_path.name
    before = notebook_path.read_bytes()
    problems = []
    with tempfile.TemporaryDirectory(prefix="render-check-") as tmp:
        server_log = Path(tmp) / "server.log"
        try:
            with (
                _jupyterlab(root, Path(tmp) / "lab", server_log) as (url, token),
                _chromium(Path(tmp) / "profile") as driver,
            ):
                driver.get(f"{url}lab/tree/{urllib.parse.quote(path)}?token={token}")
                _wait(driver, path, lambda s: s["cells"] > 0, "the notebook's cells")
                # The file browser open, as a reader has it: the notebook's column is narrower.
                _js(driver, "app.commands.execute('filebrowser:activate');")
                problems += _check_page(driver, path, "open", shots)
                if run:
                    problems += _run_all(driver, path) + _check_page(driver, path, "run", shots)
        except Exception as error:  # a problem of the page; the server's log may say why
            with contextlib.suppress(OSError):
                print(*server_log.read_text(errors="replace").splitlines()[-30:], sep="\n")
            problems.append(f"FAIL page: render check could not finish: {error!r}")
    if notebook_path.read_bytes() != before:
        problems.append(f"FAIL page: {notebook_path} was written")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebook", type=Path, default=REPO / "DoRA.ipynb")
    parser.add_argument("--no-run", action="store_true", help="check the stored outputs only")
    parser.add_argument("--screenshots", type=Path, metavar="DIR", help="save screenshots here")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it comes, also in a pipe
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        parser.error(f"no {CHROMIUM} or {CHROMEDRIVER}: apt-get install chromium chromium-driver")
    problems = check(args.notebook, not args.no_run, args.screenshots)
    verdict = f"FAILED, {len(problems)} problem(s) in" if problems else "OK:"
    print(*problems, f"render check: {verdict} {args.notebook.name}", sep="\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
