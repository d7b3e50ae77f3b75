"""Shared by the browser tests: one JupyterLab on a copy of notebooks/, screenshots, and opening a notebook in
Debian's chromium through playwright (a browser download can't work on the project's machines)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
STEP_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shots() -> Path:
    folder = Path(os.environ.get("SDKIT_SCREENSHOTS", ROOT / "build" / "browser-test"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nscreenshots: {folder}", flush=True)
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a copy of notebooks/ (its autosave never touches the repo), on a free loopback port; one per test
    module, so one notebook's kernel and saved workspace never meet the next one's."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    port, token = _free_port(), secrets.token_hex(16)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(work / "config"),
                        "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"),
                        "JUPYTERLAB_WORKSPACES_DIR": str(work / "workspaces"), "JUPYTER_RUNTIME_DIR": str(work / "rt"),
                        "SDKIT_CACHE": str(work / "cache")}  # no saved speed measurement: the CPU-feature guesses
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--notebook-dir={work / 'notebooks'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = (work / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {(work / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        server.kill()
        raise RuntimeError("JupyterLab did not answer within 60 s")
    yield url, token, work
    server.terminate()
    server.wait(20)


@contextlib.contextmanager
def open_notebook(lab, notebook: str, *, profile: str):
    """A chromium page on one notebook in the shared JupyterLab (a fresh user-data dir per notebook)."""
    from playwright.sync_api import sync_playwright

    url, token, work = lab
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) or set CHROMIUM")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(work / profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(STEP_S * 1000)
        page.goto(f"{url}/lab/tree/{notebook}?token={token}")
        try:
            yield page
        finally:
            context.close()


@pytest.fixture(scope="module")
def open_page(lab):
    """open_page(notebook, profile=...): a context manager giving a chromium page on that notebook."""
    return lambda notebook, *, profile: open_notebook(lab, notebook, profile=profile)
