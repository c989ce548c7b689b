"""What a reader sees in JupyterLab: open the notebook in headless Chromium and check the page.

    .venv/bin/python -m tools.render_check                        # open, check, Run All, check
    .venv/bin/python -m tools.render_check --no-run               # the stored outputs only
    .venv/bin/python -m tools.render_check --screenshots /tmp/shots --notebook other.ipynb

JupyterLab runs on 127.0.0.1 with throw-away settings (autosave off, every cell rendered) and
DORA_DEVICE=cpu; Debian's chromium and chromedriver reach nothing else. Once the page settles it
fails on: a markdown or output element wider than its column, an output line that only fits by
wrapping, a MathJax error or TeX left untypeset, an image that did not load (the Colab badge
needs the internet and is skipped), an error or stderr output. Unless --no-run it then does
Kernel > Restart Kernel and Run All and checks again. One line per problem; exit status 1 if
any. The notebook file is never written (its hash is compared before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
_SKIPPED_IMAGES = ("colab-badge",)  # external images that need the internet
_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the DOM
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
_SERVER_CONFIG = """\
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"
"""
_CHROMIUM_FLAGS = (
    "--headless=new --no-sandbox --disable-dev-shm-usage --disable-gpu --disable-extensions "
    "--disable-background-networking --disable-component-update --disable-sync --no-pings "
    "--no-first-run --window-size=1400,1000"
).split() + ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # only 127.0.0.1

_JS_PRELUDE = """
const app = window.jupyterapp;
function NB(path) {
  if (!app || !app.shell) return null;
  for (const w of app.shell.widgets('main'))
    if (w.context && w.context.path === path && w.content && w.content.widgets) return w;
  return null;
}
"""
_JS_STATE = (
    _JS_PRELUDE
    + """
const w = NB(arguments[0]);
if (!w) return null;
const nb = w.content, code = nb.widgets.filter(c => c.model.type === 'code');
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
const imgs = [...nb.node.querySelectorAll('img')];
return {
  cells: nb.widgets.length,
  rendered: nb.node.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown').length,
  markdown: nb.widgets.filter(c => c.model.type === 'markdown').length,
  math: nb.node.querySelectorAll('mjx-container').length,
  images: imgs.length,
  images_complete: imgs.filter(i => i.complete).length,
  outputs: nb.node.querySelectorAll('.jp-OutputArea-output').length,
  fonts: document.fonts.status,
  kernel: kernel ? kernel.status : 'none',
  running: code.filter(c => c.model.executionState === 'running').length,
  counted: code.filter(c => c.model.executionCount !== null).length,
  runnable: code.filter(c => c.model.sharedModel.getSource().trim() !== '').length,
  started: window.__renderCheckStarted || 0,
  dialog: [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent.slice(0, 120)),
};
"""
)
# Inside a formula only its container counts (italic glyphs overhang a pixel by design), and
# MathJax's hidden copy for screen readers is taken out of the layout first.
_JS_MEASURE = (
    _JS_PRELUDE
    + r"""
const nb = NB(arguments[0]).content;
const style = document.createElement('style');
style.textContent = 'mjx-assistive-mml { display: none !important; }';
document.head.appendChild(style);
function describe(el) {
  if (el.tagName === 'MJX-CONTAINER')
    return el.getAttribute('display') === 'true' ? 'display math' : 'inline math';
  if (el.classList.contains('jp-RenderedMarkdown')) return 'markdown area';
  if (el.classList.contains('jp-OutputArea-output')) return 'output area';
  return el.tagName.toLowerCase();
}
const r = {overflow: [], wrapped: [], math_errors: [], raw_tex: [], images: [], bad: []};
nb.widgets.forEach((cell, index) => {
  const found = [];
  for (const root of cell.node.querySelectorAll('.jp-RenderedMarkdown, .jp-OutputArea-output'))
    for (const el of [root, ...root.querySelectorAll('*')]) {
      const math = el.closest('mjx-container');
      if ((math && math !== el) || el.clientWidth === 0) continue;
      if (el.scrollWidth > el.clientWidth) found.push(el);
    }
  const displays = [...cell.node.querySelectorAll('mjx-container[display="true"]')];
  for (const el of found) {
    const ox = getComputedStyle(el).overflowX;
    r.overflow.push({cell: index, type: cell.model.type, element: describe(el),
      scroll: el.scrollWidth, client: el.clientWidth,
      leaf: !found.some(o => o !== el && el.contains(o)),
      scrolls: ox === 'auto' || ox === 'scroll', display_index: displays.indexOf(el),
      text: (el.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 60)});
  }
  for (const pre of cell.node.querySelectorAll('.jp-OutputArea-output pre')) {
    const cs = getComputedStyle(pre);  // each printed line measured unwrapped
    const room = pre.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    const probe = document.createElement('span');
    probe.style.whiteSpace = 'pre';
    pre.appendChild(probe);
    pre.textContent.split('\n').forEach((line, n) => {
      probe.textContent = line;
      const width = probe.getBoundingClientRect().width;
      if (line && width > room + 0.5) r.wrapped.push({cell: index, line: n + 1,
        width: Math.ceil(width), room: Math.floor(room), chars: line.length, text: line});
    });
    probe.remove();
  }
  for (const err of cell.node.querySelectorAll('mjx-merror'))
    r.math_errors.push({cell: index,
      text: err.getAttribute('data-mjx-error') || err.textContent.slice(0, 120)});
  // an undefined macro is no merror: MathJax shows its name in red
  for (const t of cell.node.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]'))
    if (t.textContent.startsWith('\\')) r.math_errors.push({cell: index,
      text: 'undefined control sequence ' + t.textContent + ' (shown in red)'});
  for (const md of cell.node.querySelectorAll('.jp-RenderedMarkdown')) {
    const walker = document.createTreeWalker(md, NodeFilter.SHOW_TEXT);
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      if (t.parentElement.closest('code, pre, mjx-container')) continue;
      const m = t.textContent.match(/\$\$|\\\(|\\\[|\\begin\{|\$[^$\s][^$]*[\\^_{}]/);
      if (m) r.raw_tex.push({cell: index,
        text: t.textContent.slice(Math.max(0, m.index - 20), m.index + 40)});
    }
  }
  for (const img of cell.node.querySelectorAll('img')) {
    const src = img.getAttribute('src') || '';
    r.images.push({cell: index, ok: img.complete && img.naturalWidth > 0,
      src: src.startsWith('data:') ? src.slice(0, 30) + '...' : src});
  }
  if (cell.model.type !== 'code') return;
  for (const out of cell.model.outputs.toJSON()) {
    if (out.output_type === 'error')
      r.bad.push({cell: index, kind: 'error',
        text: out.ename + ': ' + String(out.evalue).split('\n')[0]});
    else if (out.output_type === 'stream' && out.name === 'stderr') {
      const text = Array.isArray(out.text) ? out.text.join('') : String(out.text);
      r.bad.push({cell: index, kind: 'stderr', text: text.trim().split('\n')[0].slice(0, 120)});
    }
  }
  const shown = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]';
  if (cell.node.querySelector(shown) && !r.bad.some(b => b.cell === index))
    r.bad.push({cell: index, kind: 'stderr', text: '(shown as stderr)'});
});
style.remove();
return r;
"""
)
# Count the cells the kernel starts, then Kernel > Restart Kernel and Run All.
_JS_RUN_ALL = (
    _JS_PRELUDE
    + """
window.__renderCheckStarted = 0;
NB(arguments[0]).sessionContext.iopubMessage.connect((_, msg) => {
  if (msg.header.msg_type === 'execute_input') window.__renderCheckStarted += 1;
});
app.commands.execute('notebook:restart-run-all');
"""
)
_JS_SCROLL_TO = (
    _JS_PRELUDE
    + """
const cell = NB(arguments[0]).content.widgets[arguments[1]];
cell.node.scrollIntoView({block: arguments[2]});
return cell.node;
"""
)


def _log(message: str) -> None:
    print(message, flush=True)


def _problem(cell: int | None, kind: str, detail: str) -> tuple[int, str]:
    """(sort key, the line printed for it)."""
    where = "page" if cell is None else f"cell {cell}"
    return (-1 if cell is None else cell), f"FAIL {where}: {kind}: {detail}"


@contextlib.contextmanager
def _phase(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        _log(f"[time] {name}: {time.perf_counter() - start:.1f} s")


def _environment(home: Path) -> dict[str, str]:
    """Throw-away Jupyter directories and settings; the server's environment."""
    d = {name: home / name for name in ("config", "data", "runtime", "home", "settings", "ws")}
    for path in d.values():
        path.mkdir(parents=True)
    (d["config"] / "jupyter_server_config.py").write_text(_SERVER_CONFIG)
    for plugin, values in _SETTINGS.items():
        package, name = plugin.rsplit("/", 1)
        (d["settings"] / package).mkdir(parents=True, exist_ok=True)
        (d["settings"] / package / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env |= {f"JUPYTER_{k.upper()}_DIR": str(d[k]) for k in ("config", "data", "runtime")}
    return env | {
        "HOME": str(d["home"]),
        "IPYTHONDIR": str(d["home"] / ".ipython"),
        "MPLCONFIGDIR": str(d["home"] / ".matplotlib"),
        "DORA_DEVICE": "cpu",
        "DORA_RESULTS": str(d["home"] / "results.json"),  # Run All must not touch figures/
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "JUPYTER_TOKEN": secrets.token_hex(24),  # not on the command line, where `ps` shows it
    }


@contextlib.contextmanager
def _jupyterlab(root: Path, home: Path, log_path: Path):
    """A JupyterLab server on 127.0.0.1 (a free port); yields its URL and token."""
    env = _environment(home)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0"]
    command += ["--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", "--allow-root"]
    command += ["--LabApp.expose_app_in_browser=True"]
    command += [f"--LabApp.user_settings_dir={home / 'settings'}"]
    command += [f"--LabApp.workspaces_dir={home / 'ws'}"]
    with open(log_path, "wb") as server_log:  # its own session: kernels and all stop together
        server = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        info = Path(env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{server.pid}.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({server.returncode}):\n{_tail(log_path)}")
            with contextlib.suppress(ValueError, OSError):
                url = f"http://127.0.0.1:{int(json.loads(info.read_text())['port'])}/"
                with _LOOPBACK.open(f"{url}api/status?token={env['JUPYTER_TOKEN']}", timeout=5):
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"JupyterLab did not start in 90 s:\n{_tail(log_path)}")
        yield url, env["JUPYTER_TOKEN"]
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):  # SIGTERM stops kernels
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=wait)
                break


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


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


def _wait(driver, path: str, ready, timeout: float, what: str, polls: int = 1) -> dict:
    """Poll the page until ``ready(state)`` holds for ``polls`` polls with the same state."""
    deadline, last, stable = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline:
        state = driver.execute_script(_JS_STATE, path)
        key = state and {k: v for k, v in state.items() if k not in ("kernel", "dialog")}
        stable = stable + 1 if state and ready(state) and (polls == 1 or key == last) else 0
        if stable >= polls:
            return state
        last = key
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last state: {state})")


def _settled(s: dict) -> bool:  # MathJax, images and fonts done
    done = s["rendered"] >= s["markdown"] and s["images_complete"] == s["images"]
    return done and s["fonts"] == "loaded"


def _accept_dialogs(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    seen = []
    for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"):
        with contextlib.suppress(Exception):
            seen.append(button.text)
            button.click()
    return seen


def _display_math(source: str) -> list[str]:
    """The TeX of each display formula in a markdown cell, in order."""
    pattern = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|(\\begin\{(\w+\*?)\}.+?\\end\{\4\})", re.S)
    return [" ".join((m[1] or m[2] or m[3]).split()) for m in pattern.finditer(source)]


def _problems(measure: dict, notebook: dict, phase: str) -> list[tuple[int, str]]:
    found = []
    for o in measure["overflow"]:
        if not o["leaf"]:
            continue  # reported through the innermost element
        detail = f"{o['element']} is {o['scroll']} px wide in a {o['client']} px column"
        formulas = _display_math("".join(notebook["cells"][o["cell"]]["source"]))
        if o["element"] == "display math" and 0 <= o["display_index"] < len(formulas):
            detail += f" (formula {o['display_index'] + 1}: {formulas[o['display_index']][:70]})"
        elif o["text"]:
            detail += f" ({o['text'][:60]!r})"
        for p in measure["overflow"]:
            if p["cell"] == o["cell"] and p["scrolls"] and not p["leaf"]:
                detail += f"; horizontal scrollbar on the {p['element']} ({p['scroll']} > "
                detail += f"{p['client']})"
        found.append(_problem(o["cell"], f"{o['type']} overflow", detail))
    for o in measure["wrapped"]:
        text = o["text"] if len(o["text"]) <= 70 else o["text"][:67] + "..."
        detail = f"line {o['line']} ({o['chars']} chars) needs {o['width']} px, the output area "
        found.append(
            _problem(o["cell"], "output line wraps", f"{detail}has {o['room']} px: {text!r}")
        )
    found += [_problem(o["cell"], "MathJax error", o["text"]) for o in measure["math_errors"]]
    found += [_problem(o["cell"], "TeX not typeset", repr(o["text"])) for o in measure["raw_tex"]]
    for o in measure["images"]:
        if not o["ok"] and not any(s in o["src"] for s in _SKIPPED_IMAGES):
            found.append(_problem(o["cell"], "image did not load", o["src"]))
    found += [
        _problem(o["cell"], f"{o['kind']} output ({phase})", o["text"]) for o in measure["bad"]
    ]
    return sorted(found)


def _screenshots(driver, path: str, notebook: dict, folder: Path, prefix: str, bad: set[int]):
    """The top, the first layer, the results table, the end, and each cell with a problem."""
    cells, places = notebook["cells"], {"01-top": (0, "start")}
    for i, cell in enumerate(cells):
        text = "".join(cell["source"]) if cell["cell_type"] == "markdown" else ""
        if re.search(r"^#+\s*2\.", text, re.M):
            places.setdefault("02-section-2", (i, "start"))
        if re.search(r"results table", text, re.I):
            places.setdefault("03-results-table", (i, "start"))
    places["04-end"] = (len(cells) - 1, "end")
    places |= {f"problem-cell{i:02d}": (i, "start") for i in sorted(bad)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, (index, block) in places.items():
        node = driver.execute_script(_JS_SCROLL_TO, path, index, block)
        time.sleep(0.4)
        target = str(folder / f"{prefix}-{name}.png")
        (node.screenshot if name.startswith("problem") else driver.save_screenshot)(target)
    _log(f"screenshots ({prefix}) in {folder}")


def _check_page(driver, path, notebook, phase, shots) -> list[str]:
    with _phase(f"{phase}: settle and check"):
        _wait(driver, path, _settled, 120, "a settled page", polls=6)
        found = _problems(driver.execute_script(_JS_MEASURE, path), notebook, phase)
    for _, line in found:
        _log(line)
    if not found:
        _log(f"{phase}: no problems")
    if shots:
        bad = {cell for cell, _ in found if cell >= 0}
        _screenshots(driver, path, notebook, shots, phase, bad)
    return [line for _, line in found]


def _run_all(driver, path: str, timeout: float) -> list[tuple[int, str]]:
    """Kernel > Restart Kernel and Run All, as a reader does; wait until no cell runs."""
    state = _wait(driver, path, lambda s: s["kernel"] == "idle", 120, "an idle kernel")
    if not state["runnable"]:
        return []
    driver.execute_script(_JS_RUN_ALL, path)
    deadline = time.monotonic() + 30
    while not _accept_dialogs(driver):  # "Restart Kernel?" -> Restart
        if time.monotonic() > deadline:
            raise TimeoutError("no 'Restart Kernel?' dialog within 30 s")
        time.sleep(0.2)
    _wait(driver, path, lambda s: s["started"] > 0, 120, "the first cell to start")
    start, quiet = time.monotonic(), 0
    while quiet < 3:  # Run All queues every cell: each is "running" until its reply comes
        state = driver.execute_script(_JS_STATE, path)
        if state["dialog"]:  # e.g. "the kernel appears to have died"
            return [_problem(None, "dialog during the run", " | ".join(state["dialog"]))]
        if time.monotonic() - start > timeout:
            return [_problem(None, "run-all", f"still running after {timeout:.0f} s ({state})")]
        quiet = quiet + 1 if state["running"] == 0 and state["kernel"] == "idle" else 0
        time.sleep(0.5)
    ran = f"{state['counted']} of {state['runnable']} code cells ran"
    _log(f"run: {ran}")
    if state["counted"] < state["runnable"]:
        return [_problem(None, "run-all stopped", f"{ran}; the rest did not")]
    return []


def check(notebook_path: Path, run=True, shots: Path | None = None, timeout=1800) -> list[str]:
    """Open the notebook in JupyterLab, check it, run it (unless ``run=False``), check again."""
    notebook_path = notebook_path.resolve()
    root = REPO if notebook_path.is_relative_to(REPO) else notebook_path.parent
    path = notebook_path.relative_to(root).as_posix()
    notebook = json.loads(notebook_path.read_text())
    before = hashlib.sha256(notebook_path.read_bytes()).hexdigest()
    problems = []
    with (
        tempfile.TemporaryDirectory(prefix="render-check-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        server_log = Path(tmp) / "server.log"
        try:
            with _phase("start JupyterLab and Chromium, open the notebook"):
                url, token = stack.enter_context(_jupyterlab(root, Path(tmp) / "lab", server_log))
                driver = stack.enter_context(_chromium(Path(tmp) / "profile"))
                query = urllib.parse.urlencode({"token": token})
                driver.get(f"{url}lab/tree/{urllib.parse.quote(path)}?{query}")
                _wait(driver, path, lambda s: s["cells"] > 0, 120, "the notebook's cells")
                _accept_dialogs(driver)  # e.g. a kernel choice
                driver.execute_script(
                    _JS_PRELUDE + "if (app.shell.leftCollapsed) "
                    "app.commands.execute('filebrowser:activate');"
                )
            problems += _check_page(driver, path, notebook, "open", shots)
            if run:
                with _phase("Restart Kernel and Run All"):
                    stopped = [line for _, line in _run_all(driver, path, timeout)]
                for line in stopped:
                    _log(line)
                problems += stopped + _check_page(driver, path, notebook, "run", shots)
        except Exception as error:  # a problem of the page, with the server's log
            _log(_tail(server_log))
            error = f"{type(error).__name__}: {error}"
            problems.append(_problem(None, "render check could not finish", error)[1])
            _log(problems[-1])
    if hashlib.sha256(notebook_path.read_bytes()).hexdigest() != before:
        problems.append(_problem(None, "notebook file changed", f"{notebook_path} written")[1])
        _log(problems[-1])
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebook", type=Path, default=REPO / "DoRA.ipynb")
    parser.add_argument("--no-run", action="store_true", help="check the stored outputs only")
    parser.add_argument("--screenshots", type=Path, metavar="DIR", help="save screenshots here")
    parser.add_argument("--timeout", type=float, default=1800, help="for Run All (s)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        _log(f"FAIL page: missing {', '.join(missing)} (apt-get install chromium chromium-driver)")
        return 1
    with _phase("total"):
        problems = check(args.notebook, not args.no_run, args.screenshots, args.timeout)
    name = args.notebook.name
    _log(
        f"render check: FAILED, {len(problems)} problem(s) in {name}"
        if problems
        else f"render check: OK ({name})"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
