"""Helpers for the browser test: a private JupyterLab server and a notebook driven in Chromium.

`test_browser.py` starts JupyterLab the way a learner does, with ``make lab`` (so the same
options, the ``--allow-root`` that containers and CI need and the course settings in
``.jupyter/``), on a free localhost port, over a temporary folder that holds copies of
the notebooks it opens (so nothing is written into the repository), and drives it with
Playwright in Debian's Chromium, found by its path (Playwright never downloads a
browser here).

Everything the server and its kernels write (runtime files, lab settings and workspaces,
IPython history) goes to the temporary folder too; the lab extensions installed in the
environment (ipywidgets' widget manager among them) stay visible because they live in
``sys.prefix/share/jupyter``, which no setting here hides.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # a dependency of ipykernel
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
# `make lab` runs JupyterLab from the environment of the interpreter running the tests.
BIN = Path(sys.executable).parent
STAMP = ".venv/.course-installed"  # the Makefile's set-up stamp, never remade here (make -o)
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright drives it by path
# Flags that keep Chromium quiet and offline-friendly in a container. Playwright adds
# --headless and a fresh --user-data-dir itself.
CHROMIUM_ARGS = [
    "--no-sandbox",  # runs as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> Path:
    """Debian's Chromium, or skip (fail on CI, which must run the browser tests)."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: install Debian's package (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return CHROMIUM


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    """Headless Chromium driven by Playwright, closed afterwards."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(require_chromium()), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


SERVER_START_TIMEOUT_S = 90.0
SERVER_STOP_TIMEOUT_S = 15.0

# Lab settings written into the private settings folder: no news or update pop-ups
# (there is no internet, and a toast could cover what the test clicks).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabServer:
    """A running JupyterLab: its address, token, the folder it serves and its log."""

    process: subprocess.Popen
    port: int
    token: str
    root_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0) -> Any:
        """JSON answer of the server's REST API at ``/api/<path>``."""
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        # ?reset starts from an empty workspace, so no layout of an earlier page comes back.
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _private_env(work: Path) -> dict[str, str]:
    """Environment of the server (and its kernels) with every per-user folder in ``work``."""
    env = dict(os.environ)
    folders = {
        "JUPYTER_CONFIG_DIR": work / "jupyter-config",
        "JUPYTER_DATA_DIR": work / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": work / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": work / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": work / "lab-workspaces",
        "IPYTHONDIR": work / "ipython",
    }
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        env[name] = str(folder)
    for relative, settings in LAB_SETTINGS.items():
        path = folders["JUPYTERLAB_SETTINGS_DIR"] / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    # The kernels import this checkout's course_lib even when it is not pip-installed.
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in paths if p != str(ROOT)]])
    env.pop("JUPYTER_TOKEN", None)  # the token comes from the command line only
    return env


def lab_command(root_dir: Path, port: int, token: str) -> list[str]:
    """``make lab`` serving ``root_dir`` on 127.0.0.1:``port`` with ``token``, no browser.

    The Makefile's own recipe starts the server, so what runs here is what a learner runs
    (``--allow-root`` included when the tests run as root, as on CI). ``-o`` keeps make
    from re-running the set-up (pip) if requirements.txt is newer than the stamp.
    """
    make = shutil.which("make")
    if make is None:
        raise RuntimeError("`make` is not on PATH: the browser test starts JupyterLab with `make lab`")
    options = [
        "--no-browser",
        f"--port={port}",
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port_retries=0",  # fail instead of silently moving to another port
        f"--IdentityProvider.token={token}",  # jupyter_server 2: the token lives here
        "--ServerApp.password=",
        "--LabApp.news_url=",  # offline: never ask for Jupyter news
    ]
    return [
        make, "--no-print-directory", "-C", str(ROOT), "-o", STAMP, "lab",
        f"BIN={BIN}", f"LAB_ROOT={root_dir}", "LAB_ARGS=" + " ".join(options),
    ]


def _start(root_dir: Path, work: Path, port: int, token: str) -> LabServer:
    log_path = work / f"jupyterlab-{port}.log"
    env = _private_env(work)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(name, None)  # under `make test`, the outer make's flags are not this one's
    with open(log_path, "wb") as log:
        # A new session makes make (and the server it starts) a process-group leader, so
        # stop() can signal the whole group; kernels get sessions of their own and are
        # stopped one by one.
        process = subprocess.Popen(
            lab_command(root_dir, port, token), cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return LabServer(process, port, token, root_dir, log_path)


def _wait_ready(server: LabServer, timeout: float) -> bool:
    """True once /api/status answers; False if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            server.api("status", timeout=2.0)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.3)
    return False


def stop(server: LabServer) -> None:
    """Shut the server down and make sure it and every process it started are gone.

    SIGTERM lets jupyter_server shut its kernels down cleanly; whatever is still alive
    after that (the server's process group, kernels in their own sessions) is killed.
    """
    try:
        parent = psutil.Process(server.process.pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if server.process.poll() is None:
        try:
            os.killpg(server.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    server.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    # psutil.Process remembers each child's start time, so kill() never hits a reused pid.
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=SERVER_STOP_TIMEOUT_S)


@contextmanager
def jupyter_lab(root_dir: Path, work: Path, attempts: int = 3) -> Iterator[LabServer]:
    """A JupyterLab serving ``root_dir`` on a free port with a random token; always stopped."""
    token = secrets.token_hex(24)
    logs = []
    for _ in range(attempts):  # another process may grab the free port before the server does
        server = _start(root_dir, work, free_port(), token)
        try:
            ready = _wait_ready(server, SERVER_START_TIMEOUT_S)
        except BaseException:
            stop(server)
            raise
        if ready:
            break
        stop(server)
        logs.append(server.log()[-3000:])
    else:
        raise RuntimeError("JupyterLab did not start; its logs:\n" + "\n----\n".join(logs))
    try:
        yield server
    finally:
        stop(server)


# ----------------------------------------------------------------------------- the notebook page

# The notebook panel in front (lab keeps hidden panels of other tabs in the DOM).
_ACTIVE_PANEL_JS = "const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');"

# Every code cell's prompt: "[ ]:" not run, "[*]:" queued or running, "[12]:" done.
_CELL_STATES_JS = """
() => Array.from(document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell'))
  .map(cell => {
    if (!cell.classList.contains('jp-CodeCell')) return {code: false};
    const prompt = cell.querySelector('.jp-InputArea-prompt');
    const text = prompt ? prompt.textContent.trim() : '';
    return {code: true, prompt: text,
            outputs: Array.from(cell.querySelectorAll('.jp-OutputArea-output')).map(o => ({
              mime: o.getAttribute('data-mime-type') || '', text: o.textContent || ''}))};
  })
"""


def cell_states(page: Page) -> list[dict[str, Any]]:
    """One dict per cell of the open notebook: ``code``, and for code cells ``prompt``
    (e.g. ``"[3]:"``) and ``outputs`` (``mime``, ``text``).

    The text is the DOM's textContent: innerText would be empty for cells scrolled out
    of view, which JupyterLab 4 skips rendering (``content-visibility: auto``).
    """
    return page.evaluate(_CELL_STATES_JS)


def execution_count(state: dict[str, Any]) -> int | None:
    """The number in a code cell's prompt, or None when it has not run (or is still running)."""
    digits = state.get("prompt", "").strip("[]: ")
    return int(digits) if digits.isdigit() else None


def open_notebook(page: Page, server: LabServer, notebook: str, timeout_ms: float) -> None:
    """Open ``notebook`` in a fresh lab workspace and wait until its kernel is idle."""
    page.goto(server.lab_url(notebook), timeout=timeout_ms)
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_ms)
    wait_kernel_idle(page, timeout_ms)


# True when the notebook has a kernel and the toolbar's indicator says it is idle.
_KERNEL_IDLE_JS = f"""() => {{ {_ACTIVE_PANEL_JS}
    if (!panel) return false;
    const name = panel.querySelector('.jp-KernelName');
    const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
    const kernel = name ? name.textContent.trim() : '';
    return kernel !== '' && kernel !== 'No Kernel'
           && ind !== null && ind.getAttribute('data-status') === 'idle'; }}"""


def wait_kernel_idle(page: Page, timeout_ms: float) -> None:
    """Wait until the notebook has a kernel and the toolbar's indicator says it is idle.

    Before the kernel is connected the indicator can read idle too (with "No Kernel" as
    the kernel name); running cells then would open the kernel-selection dialog.
    """
    page.wait_for_function(_KERNEL_IDLE_JS, timeout=timeout_ms, polling=250)


def click_menu(page: Page, menu: str, item: str) -> None:
    """Click ``menu`` → ``item`` in the lab's menu bar, by their labels (as a learner would)."""
    page.locator(".lm-MenuBar-item").filter(has_text=menu).first.click()
    label = page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel")
    label.get_by_text(item, exact=True).click()


def run_and_wait(page: Page, item: str, timeout_ms: float) -> list[dict[str, Any]]:
    """Click Run → ``item`` and wait until every cell it queued has finished.

    Finished means: no prompt shows ``[*]``, more code cells carry an execution count
    than before (the command ran at least one cell) and the kernel is idle.
    """
    before = sum(execution_count(s) is not None for s in cell_states(page) if s["code"])
    click_menu(page, "Run", item)
    page.wait_for_function(
        f"""() => {{
            const cells = ({_CELL_STATES_JS})().filter(c => c.code);
            const running = cells.some(c => c.prompt.includes('*'));
            const done = cells.filter(c => /\\[\\d+\\]/.test(c.prompt)).length;
            return !running && done > {before};
        }}""",
        timeout=timeout_ms,
        polling=500,
    )
    wait_kernel_idle(page, timeout_ms)
    return cell_states(page)


def run_all_and_wait(
    page: Page, timeout_ms: float, quiet_s: float = 10.0
) -> list[dict[str, Any]]:
    """Click Run → Run All Cells; wait until every code cell has run, or Run All stopped.

    When a cell fails, JupyterLab clears the ``[*]`` of the cells still queued behind it,
    even those the kernel goes on to run (a ``raises-exception`` cell does not stop the
    queue), so "no ``[*]`` left" does not mean done here. Done means every code cell
    shows an execution count; stopped means no count changed for ``quiet_s`` seconds
    while no cell showed ``[*]`` and the kernel was idle (the kernel dropped the rest of
    the queue). The caller tells the two apart from the returned cell states.
    """
    click_menu(page, "Run", "Run All Cells")
    deadline = time.monotonic() + timeout_ms / 1000
    last: tuple[int | None, ...] = ()
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        states = cell_states(page)
        code = [s for s in states if s["code"]]
        counts = tuple(execution_count(s) for s in code)
        if all(c is not None for c in counts):
            wait_kernel_idle(page, timeout_ms)
            return cell_states(page)
        settled = (
            counts == last
            and not any("*" in s["prompt"] for s in code)
            and page.evaluate(_KERNEL_IDLE_JS)
        )
        if not settled:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return states
        last = counts
        page.wait_for_timeout(500)
    raise TimeoutError(f"Run All did not finish within {timeout_ms / 1000:.0f} s")


def save(page: Page, timeout_ms: float) -> None:
    """Save the open notebook (File → Save) and wait until it is no longer marked dirty."""
    click_menu(page, "File", "Save Notebook")
    page.wait_for_function(
        """() => { const tab = document.querySelector('.lm-TabBar-tab.lm-mod-current.jp-mod-dirty');
                   return tab === null; }""",
        timeout=timeout_ms,
    )


def clear_all_outputs(page: Page, timeout_ms: float) -> None:
    """Edit → Clear Outputs of All Cells, then wait until no code cell shows a count or output."""
    click_menu(page, "Edit", "Clear Outputs of All Cells")
    page.wait_for_function(
        f"""() => ({_CELL_STATES_JS})().filter(c => c.code)
                    .every(c => !/\\d/.test(c.prompt) && c.outputs.length === 0)""",
        timeout=timeout_ms,
    )


# IPython prints this header above every traceback it renders.
TRACEBACK_HEADER = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"\w+(Error|Exception): ")


def shows_error(state: dict[str, Any]) -> bool:
    """True when a code cell's rendered output holds a traceback (an error output).

    JupyterLab renders error outputs with the stderr mime type, like warnings; the
    traceback header and the ``Cell In[n]`` line tell an error from a warning. A failed
    visible check renders as its message alone (``ExerciseError._render_traceback_``),
    so an output that starts with ``SomeError: `` counts too.
    """
    return any(
        o["mime"] == "application/vnd.jupyter.stderr"
        and (TRACEBACK_HEADER in o["text"] or "Cell In[" in o["text"]
             or ERROR_LINE.match(o["text"].lstrip()) is not None)
        for o in state.get("outputs", [])
    )
