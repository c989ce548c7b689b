"""What a reader sees in JupyterLab: open the notebook in headless Chromium and check the page.

    .venv/bin/python -m tools.render_check                        # open, check, Run All, check
    .venv/bin/python -m tools.render_check --no-run               # the stored outputs only
    .venv/bin/python -m tools.render_check --screenshots /tmp/shots --notebook other.ipynb

1. starts JupyterLab on 127.0.0.1 (random port, random token, throw-away config, data and home
   directories, autosave off, news and update checks off, every cell rendered at once) with
   DORA_DEVICE=cpu, and opens the notebook in Debian's headless Chromium (/usr/bin/chromium and
   /usr/bin/chromedriver, driven by selenium; nothing is downloaded; the browser reaches
   nothing but 127.0.0.1) in a 1400 x 1000 window with the file browser open;
2. waits for MathJax and the images, then fails on: a markdown or output element wider than its
   column (scrollWidth > clientWidth; MathJax's hidden screen-reader copy and glyph overhangs
   inside a formula do not count), an output line that only fits by wrapping (measured
   unwrapped), a MathJax error or TeX left untypeset, an image that did not load (the Colab badge
   needs the internet and is skipped), and an error or stderr output;
3. unless --no-run: Kernel > Restart Kernel and Run All (the restart dialog confirmed), waits
   until no cell is running, and checks the page again (now with this machine's outputs);
4. saves screenshots (top, section 2, the results table, the end, and each cell with a problem)
   and prints one line per problem and the time of each phase. Exit status 0 when clean, else 1.

The notebook file is never written (autosave is off; its hash is compared before and after).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1400, 1000)
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
SKIPPED_IMAGES = ("colab-badge",)  # external images that need the internet (src substrings)

# Lab settings for the throw-away user settings directory.
SETTINGS = {
    # every cell in the DOM (no lazy rendering), so each can be measured where it stands
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    # never write the notebook back, whatever the run changes
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
SERVER_CONFIG = """\
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"
"""
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=AutofillServerCommunication,NetworkTimeServiceQuerying,"
    "OptimizationHints,MediaRouter,Translate",
    "--no-pings",
    "--no-default-browser-check",
    # Only 127.0.0.1: host names other than it resolve to nothing, and chromium() sends every
    # request that is not to the loopback interface (Chromium never proxies those) to a "proxy"
    # on a local port that is bound and never listens, so it is refused on this machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
]


@dataclass
class Problem:
    cell: int | None  # index in the notebook's cell list (0-based), None for the page
    kind: str
    detail: str

    def __str__(self) -> str:
        where = "page" if self.cell is None else f"cell {self.cell}"
        return f"FAIL {where}: {self.kind}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# JavaScript run in the page. `NB(path)` finds the notebook panel among the main-area widgets.

JS_PRELUDE = """
const app = window.jupyterapp;
function NB(path) {
  if (!app || !app.shell) return null;  // the page is still loading
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.content && w.content.widgets) return w;
  }
  return null;
}
"""

JS_STATE = (
    JS_PRELUDE
    + """
const w = NB(arguments[0]);
if (!w) return null;
const nb = w.content;
const code = nb.widgets.filter(c => c.model.type === 'code');
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
const imgs = [...nb.node.querySelectorAll('img')];
return {
  cells: nb.widgets.length,
  rendered_markdown: nb.node.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown').length,
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
  left_open: !app.shell.leftCollapsed,
};
"""
)

# Overflow: every markdown and output element whose content is wider than its box. Inside a
# formula only the container counts (glyph overhangs of italic letters are a pixel or two by
# design), and MathJax's hidden MathML copy for screen readers is taken out of the layout first.
JS_MEASURE = (
    JS_PRELUDE
    + r"""
const w = NB(arguments[0]);
const nb = w.content;
const style = document.createElement('style');
style.textContent = 'mjx-assistive-mml { display: none !important; }';
document.head.appendChild(style);
function describe(el) {
  const tag = el.tagName.toLowerCase();
  if (tag === 'mjx-container') return el.getAttribute('display') === 'true' ? 'display math'
                                                                            : 'inline math';
  if (el.classList.contains('jp-RenderedMarkdown')) return 'markdown area';
  if (el.classList.contains('jp-OutputArea-output')) return 'output area';
  return tag + (el.className && typeof el.className === 'string'
                ? '.' + el.className.trim().split(/\s+/).slice(0, 2).join('.') : '');
}
const result = {overflow: [], wrapped: [], math_errors: [], raw_tex: [], images: [],
                bad_outputs: [], column: {}};
nb.widgets.forEach((cell, index) => {
  const roots = [...cell.node.querySelectorAll('.jp-RenderedMarkdown, .jp-OutputArea-output')];
  const found = [];
  for (const root of roots) {
    for (const el of [root, ...root.querySelectorAll('*')]) {
      const math = el.closest('mjx-container');
      if (math && math !== el) continue;
      if (el.clientWidth === 0) continue;  // inline boxes have no width of their own
      if (el.scrollWidth > el.clientWidth) found.push(el);
    }
  }
  const displays = [...cell.node.querySelectorAll('mjx-container[display="true"]')];
  for (const el of found) {
    const ox = getComputedStyle(el).overflowX;
    result.overflow.push({
      cell: index, type: cell.model.type, element: describe(el),
      scroll: el.scrollWidth, client: el.clientWidth,
      leaf: !found.some(o => o !== el && el.contains(o)),
      scrolls: ox === 'auto' || ox === 'scroll',
      display_index: displays.indexOf(el),
      text: (el.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 60),
    });
  }
  // printed text that only fits by wrapping: measure each line unwrapped
  for (const pre of cell.node.querySelectorAll('.jp-OutputArea-output pre')) {
    const cs = getComputedStyle(pre);
    const room = pre.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    const probe = document.createElement('span');
    probe.style.whiteSpace = 'pre';
    pre.appendChild(probe);
    const lines = pre.textContent.split('\n');
    lines.forEach((line, n) => {
      if (!line) return;
      probe.textContent = line;
      const width = probe.getBoundingClientRect().width;
      if (width > room + 0.5) {
        result.wrapped.push({cell: index, line: n + 1, width: Math.ceil(width),
                             room: Math.floor(room), chars: line.length, text: line});
      }
    });
    probe.remove();
  }
  for (const err of cell.node.querySelectorAll('mjx-merror')) {
    result.math_errors.push({cell: index,
      text: err.getAttribute('data-mjx-error') || err.textContent.slice(0, 120)});
  }
  // an undefined macro is not an merror: MathJax prints its name in red (the noundefined package)
  for (const t of cell.node.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]')) {
    if (t.textContent.startsWith('\\')) {
      result.math_errors.push({cell: index,
        text: 'undefined control sequence ' + t.textContent + ' (shown in red)'});
    }
  }
  for (const md of cell.node.querySelectorAll('.jp-RenderedMarkdown')) {
    const walker = document.createTreeWalker(md, NodeFilter.SHOW_TEXT);
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      if (t.parentElement.closest('code, pre, mjx-container')) continue;
      const m = t.textContent.match(/\$\$|\\\(|\\\[|\\begin\{|\$[^$\s][^$]*[\\^_{}]/);
      if (m) result.raw_tex.push({cell: index,
        text: t.textContent.slice(Math.max(0, m.index - 20), m.index + 40)});
    }
  }
  for (const img of cell.node.querySelectorAll('img')) {
    const src = img.getAttribute('src') || '';
    result.images.push({cell: index, ok: img.complete && img.naturalWidth > 0,
      src: src.startsWith('data:') ? src.slice(0, 30) + '...' : src});
  }
  if (cell.model.type === 'code') {
    for (const out of cell.model.outputs.toJSON()) {
      if (out.output_type === 'error') {
        result.bad_outputs.push({cell: index, kind: 'error',
          text: out.ename + ': ' + String(out.evalue).split('\n')[0]});
      } else if (out.output_type === 'stream' && out.name === 'stderr') {
        const text = Array.isArray(out.text) ? out.text.join('') : String(out.text);
        result.bad_outputs.push({cell: index, kind: 'stderr',
          text: text.trim().split('\n')[0].slice(0, 120)});
      }
    }
    const shown = cell.node.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').length;
    if (shown && !result.bad_outputs.some(b => b.cell === index)) {
      result.bad_outputs.push({cell: index, kind: 'stderr', text: '(shown as stderr)'});
    }
  }
});
const md = nb.node.querySelector('.jp-MarkdownCell .jp-RenderedMarkdown p');
const out = nb.node.querySelector('.jp-OutputArea-output');
result.column = {paragraph: md ? md.clientWidth : null, output: out ? out.clientWidth : null,
                 viewport: window.innerWidth + ' x ' + window.innerHeight};
style.remove();
return result;
"""
)

# Count the cells the kernel starts (execute_input), then Kernel > Restart Kernel and Run All.
JS_RUN_ALL = (
    JS_PRELUDE
    + """
const w = NB(arguments[0]);
window.__renderCheckStarted = 0;
w.sessionContext.iopubMessage.connect((_, msg) => {
  if (msg.header.msg_type === 'execute_input') window.__renderCheckStarted += 1;
});
app.commands.execute('notebook:restart-run-all');
return true;
"""
)

JS_SCROLL_TO = (
    JS_PRELUDE
    + """
const w = NB(arguments[0]);
const cell = w.content.widgets[arguments[1]];
cell.node.scrollIntoView({block: arguments[2]});
return cell.node;
"""
)


# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


def reported(problems: list[Problem]) -> list[Problem]:
    for problem in problems:
        log(str(problem))
    return problems


class Phases:
    """Wall time per phase, printed as each one ends."""

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            log(f"[time] {name}: {time.perf_counter() - start:.1f} s")


def write_settings(home: Path) -> dict[str, str]:
    """Throw-away Jupyter directories; returns the environment for the server."""
    dirs = {name: home / name for name in ("config", "data", "runtime", "home", "settings", "ws")}
    for path in dirs.values():
        path.mkdir(parents=True)
    (dirs["config"] / "jupyter_server_config.py").write_text(SERVER_CONFIG)
    for plugin, values in SETTINGS.items():
        package, name = plugin.rsplit("/", 1)
        target = dirs["settings"] / package / f"{name}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("JUPYTER") or key.startswith("JPY_"):
            del env[key]
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        HOME=str(dirs["home"]),
        IPYTHONDIR=str(dirs["home"] / ".ipython"),
        MPLCONFIGDIR=str(dirs["home"] / ".matplotlib"),
        DORA_DEVICE="cpu",
        DORA_RESULTS=str(dirs["home"] / "results.json"),  # Run All must not touch figures/
        JUPYTER_PLATFORM_DIRS="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return env


@contextlib.contextmanager
def jupyterlab(root: Path, home: Path, log_path: Path):
    """A JupyterLab server on 127.0.0.1; yields its base URL and token; stops it by PID."""
    env = write_settings(home)
    token = secrets.token_hex(24)
    env["JUPYTER_TOKEN"] = token  # not on the command line, where `ps` shows it
    runtime = Path(env["JUPYTER_RUNTIME_DIR"])
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        "--port=0",  # the OS picks a free port; the server writes it to its info file
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        "--allow-root",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={home / 'settings'}",
        f"--LabApp.workspaces_dir={home / 'ws'}",
    ]
    with open(log_path, "wb") as server_log:
        server = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches only this script
        )
    try:
        info_file = runtime / f"jpserver-{server.pid}.json"
        deadline = time.monotonic() + 90
        url = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({server.returncode}):\n{tail(log_path)}")
            if info_file.exists():
                with contextlib.suppress(ValueError, OSError):
                    info = json.loads(info_file.read_text())
                    url = f"http://127.0.0.1:{int(info['port'])}/"
                    with LOOPBACK.open(f"{url}api/status?token={token}", timeout=5):
                        break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"JupyterLab did not start in 90 s:\n{tail(log_path)}")
        yield url, token
    finally:
        stop(server)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server shuts its kernels down); if it hangs, SIGKILL it and its children."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in [*children(process.pid), process.pid]:  # the kernels, then the server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def chromium(profile: Path):
    os.environ["SE_OFFLINE"] = "true"  # selenium must never fetch a browser or a driver
    for key in ("NO_PROXY", "no_proxy"):  # selenium talks to chromedriver on 127.0.0.1
        os.environ[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1", "localhost"]))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with socket.socket() as refuser:
        refuser.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        proxy = f"--proxy-server=http://127.0.0.1:{refuser.getsockname()[1]}"
        for flag in [*CHROMIUM_FLAGS, proxy, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_script_timeout(60)
            yield driver
        finally:
            driver.quit()


def wait_for(driver, path: str, ready, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = driver.execute_script(JS_STATE, path)
        if state and ready(state):
            return state
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last state: {state})")


def settle(driver, path: str, timeout: float = 120) -> dict:
    """Wait until MathJax, the images and the fonts stop changing the page (1.5 s unchanged)."""
    keys = ("rendered_markdown", "math", "images", "images_complete", "outputs", "fonts")
    deadline = time.monotonic() + timeout
    last, stable = None, 0
    while time.monotonic() < deadline:
        state = driver.execute_script(JS_STATE, path)
        signature = tuple(state[k] for k in keys)
        done = (
            state["rendered_markdown"] >= state["markdown"]
            and state["images_complete"] == state["images"]
            and state["fonts"] == "loaded"
        )
        stable = stable + 1 if signature == last and done else 0
        if stable >= 6:
            return state
        last = signature
        time.sleep(0.25)
    raise TimeoutError(f"the page kept changing for {timeout:.0f} s (last: {state})")


def accept_dialogs(driver) -> list[str]:
    """Accept any open dialog (e.g. a kernel choice for a notebook without kernelspec)."""
    from selenium.webdriver.common.by import By

    seen = []
    for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"):
        with contextlib.suppress(Exception):
            seen.append(button.text)
            button.click()
    return seen


def display_math_sources(source: str) -> list[str]:
    """The TeX of each display formula in a markdown cell, in order ($$...$$ and \\[...\\])."""
    pattern = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|(\\begin\{(\w+\*?)\}.+?\\end\{\4\})", re.S)
    return [
        " ".join((m.group(1) or m.group(2) or m.group(3)).split()) for m in pattern.finditer(source)
    ]


def problems_from(measure: dict, notebook: dict, phase: str) -> list[Problem]:
    problems = []
    cells = notebook["cells"]
    for o in measure["overflow"]:
        if not o["leaf"]:
            continue  # reported through the innermost element; scrollbars are added below
        detail = f"{o['element']} is {o['scroll']} px wide in a {o['client']} px column"
        if o["element"] == "display math" and o["display_index"] >= 0:
            sources = display_math_sources("".join(cells[o["cell"]]["source"]))
            if o["display_index"] < len(sources):
                detail += f" (formula {o['display_index'] + 1}: {sources[o['display_index']][:70]})"
        elif o["text"]:
            detail += f" ({o['text'][:60]!r})"
        outer = [
            p
            for p in measure["overflow"]
            if p["cell"] == o["cell"] and p["scrolls"] and p is not o and not p["leaf"]
        ]
        for p in outer:
            detail += (
                f"; horizontal scrollbar on the {p['element']} ({p['scroll']} > {p['client']})"
            )
        problems.append(Problem(o["cell"], f"{o['type']} overflow", detail))
    for o in measure["wrapped"]:
        text = o["text"] if len(o["text"]) <= 70 else o["text"][:67] + "..."
        problems.append(
            Problem(
                o["cell"],
                "output line wraps",
                f"line {o['line']} ({o['chars']} chars) needs {o['width']} px, the output area "
                f"has {o['room']} px: {text!r}",
            )
        )
    for o in measure["math_errors"]:
        problems.append(Problem(o["cell"], "MathJax error", o["text"]))
    for o in measure["raw_tex"]:
        problems.append(Problem(o["cell"], "TeX not typeset", repr(o["text"])))
    for o in measure["images"]:
        if o["ok"] or any(s in o["src"] for s in SKIPPED_IMAGES):
            continue
        problems.append(Problem(o["cell"], "image did not load", o["src"]))
    for o in measure["bad_outputs"]:
        problems.append(Problem(o["cell"], f"{o['kind']} output ({phase})", o["text"]))
    return problems


def summary(measure: dict, state: dict) -> str:
    images = measure["images"]
    skipped = [o for o in images if not o["ok"] and any(s in o["src"] for s in SKIPPED_IMAGES)]
    loaded = sum(o["ok"] for o in images)
    column = measure["column"]
    return (
        f"{state['cells']} cells, {state['math']} formulas typeset, {loaded}/{len(images)} images "
        f"loaded ({len(skipped)} skipped: needs the internet), {state['outputs']} outputs; "
        f"viewport {column['viewport']}, paragraph column {column['paragraph']} px, output "
        f"column {column['output']} px, file browser {'open' if state['left_open'] else 'closed'}"
    )


def find_cells(notebook: dict) -> dict[str, tuple[int, str]]:
    """Cells to photograph: name -> (cell index, where it goes in the window)."""
    cells = notebook["cells"]
    places = {"01-top": (0, "start")}
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        if cell["cell_type"] != "markdown":
            continue
        if "02-section-2" not in places and re.search(r"^#+\s*2\.", text, re.M):
            places["02-section-2"] = (i, "start")
        if "03-results-table" not in places and re.search(r"results table", text, re.I):
            places["03-results-table"] = (i, "start")
    places["04-end"] = (len(cells) - 1, "end")
    return places


def screenshots(driver, path: str, notebook: dict, folder: Path, prefix: str, bad: set[int]):
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for name, (index, block) in find_cells(notebook).items():
        driver.execute_script(JS_SCROLL_TO, path, index, block)
        time.sleep(0.4)
        target = folder / f"{prefix}-{name}.png"
        driver.save_screenshot(str(target))
        saved.append(target)
    for index in sorted(bad):
        node = driver.execute_script(JS_SCROLL_TO, path, index, "start")
        time.sleep(0.3)
        target = folder / f"{prefix}-problem-cell{index:02d}.png"
        node.screenshot(str(target))
        saved.append(target)
    log(f"screenshots ({prefix}): " + ", ".join(str(p) for p in saved))


def check_page(driver, path, notebook, phase, shots, phases) -> list[Problem]:
    with phases(f"{phase}: settle (MathJax, images, fonts)"):
        state = settle(driver, path)
    with phases(f"{phase}: check"):
        measure = driver.execute_script(JS_MEASURE, path)
        problems = sorted(problems_from(measure, notebook, phase), key=lambda p: p.cell or 0)
    log(f"{phase}: {summary(measure, state)}")
    reported(problems)
    if not problems:
        log(f"{phase}: no problems")
    if shots:
        with phases(f"{phase}: screenshots"):
            bad = {p.cell for p in problems if p.cell is not None}
            screenshots(driver, path, notebook, shots, phase, bad)
    return problems


def run_all(driver, path: str, timeout: float) -> list[Problem]:
    """Kernel > Restart Kernel and Run All, as a reader does; wait until no cell is running."""
    state = wait_for(driver, path, lambda s: s["kernel"] == "idle", 120, "an idle kernel")
    if not state["runnable"]:
        log("run: no code to run")
        return []
    driver.execute_script(JS_RUN_ALL, path)
    deadline = time.monotonic() + 30
    while not accept_dialogs(driver):  # "Restart Kernel?" -> Restart
        if time.monotonic() > deadline:
            raise TimeoutError("no 'Restart Kernel?' dialog within 30 s")
        time.sleep(0.2)
    # Run All queues every code cell at once: each is "running" until its reply comes back.
    wait_for(driver, path, lambda s: s["started"] > 0, 120, "the first cell to start")
    start = last_report = time.monotonic()
    finished = 0
    while finished < 3:  # three quiet polls in a row: no cell running, kernel idle
        state = driver.execute_script(JS_STATE, path)
        if state["dialog"]:  # e.g. "the kernel appears to have died"
            return [Problem(None, "dialog during the run", " | ".join(state["dialog"]))]
        quiet = state["running"] == 0 and state["kernel"] == "idle"
        finished = finished + 1 if quiet else 0
        if time.monotonic() - start > timeout:
            return [Problem(None, "run-all", f"still running after {timeout:.0f} s ({state})")]
        if time.monotonic() - last_report > 30:
            log(f"  ... {time.monotonic() - start:.0f} s, {state['running']} cells to go")
            last_report = time.monotonic()
        time.sleep(0.5)
    log(f"run: {state['counted']} of {state['runnable']} code cells ran")
    if state["counted"] < state["runnable"]:
        return [
            Problem(
                None,
                "run-all stopped",
                f"{state['counted']} of {state['runnable']} code cells ran; the rest did not",
            )
        ]
    return []


def check(
    notebook_path: Path,
    run: bool = True,
    shots: Path | None = None,
    timeout: float = 1800,
) -> list[Problem]:
    """Open the notebook in JupyterLab, check it, run it (unless run=False), check it again."""
    notebook_path = notebook_path.resolve()
    root = REPO if notebook_path.is_relative_to(REPO) else notebook_path.parent
    path = notebook_path.relative_to(root).as_posix()
    notebook = json.loads(notebook_path.read_text())
    before = hashlib.sha256(notebook_path.read_bytes()).hexdigest()
    phases = Phases()
    problems: list[Problem] = []
    with tempfile.TemporaryDirectory(prefix="render-check-") as tmp:
        server_log = Path(tmp) / "server.log"
        stack = contextlib.ExitStack()
        try:
            with phases("start JupyterLab"):
                url, token = stack.enter_context(
                    jupyterlab(root, Path(tmp) / "jupyter", server_log)
                )
            with phases("start Chromium"):
                driver = stack.enter_context(chromium(Path(tmp) / "profile"))
            with phases("open the notebook (until its cells are on the page)"):
                query = urllib.parse.urlencode({"token": token})
                driver.get(f"{url}lab/tree/{urllib.parse.quote(path)}?{query}")
                wait_for(driver, path, lambda s: s["cells"] > 0, 120, "the notebook's cells")
                for label in accept_dialogs(driver):  # e.g. a kernel choice
                    log(f"accepted a dialog: {label}")
                driver.execute_script(
                    JS_PRELUDE + "if (app.shell.leftCollapsed) "
                    "app.commands.execute('filebrowser:activate');"
                )
            problems += check_page(driver, path, notebook, "open", shots, phases)
            if run:
                with phases("Restart Kernel and Run All"):
                    problems += reported(run_all(driver, path, timeout))
                problems += check_page(driver, path, notebook, "run", shots, phases)
        except Exception as error:  # report it as a problem of the page, with the server's log
            log(tail(server_log))
            problems += reported(
                [Problem(None, "render check could not finish", f"{type(error).__name__}: {error}")]
            )
        finally:
            with phases("stop Chromium and JupyterLab"):
                stack.close()
    if hashlib.sha256(notebook_path.read_bytes()).hexdigest() != before:
        problems += reported([Problem(None, "notebook file changed", f"{notebook_path} written")])
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
        log(f"FAIL page: missing {', '.join(missing)} (apt-get install chromium chromium-driver)")
        return 1
    start = time.perf_counter()
    problems = check(args.notebook, not args.no_run, args.screenshots, args.timeout)
    log(f"[time] total: {time.perf_counter() - start:.1f} s")
    if problems:
        log(f"render check: FAILED, {len(problems)} problem(s) in {args.notebook.name}")
        return 1
    log(f"render check: OK ({args.notebook.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
