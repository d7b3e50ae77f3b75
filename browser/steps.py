"""What a learner does in JupyterLab, as steps the browser tests share (not a test module itself)."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from playwright.sync_api import Page, expect

STEP_S = 60


def gallery_count(page: Page) -> int:
    return page.locator(".sdkit-gallery-item").count()


def wait_gallery(page: Page, count: int, *, timeout_s: float = STEP_S) -> None:
    page.wait_for_function(f"document.querySelectorAll('.sdkit-gallery-item').length >= {count}",
                           timeout=timeout_s * 1000)


def newest_parameters(page: Page) -> str:
    """The parameters text of the newest picture in the gallery (in its closed <details>)."""
    return page.locator(".sdkit-gallery-item pre").first.text_content()


def status(page: Page) -> str:
    return page.locator(".sdkit-status").inner_text()


def run_all(page: Page) -> None:
    """Run → Run All Cells, from the menu bar."""
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    item = page.locator(".lm-Menu-item", has_text="Run All Cells").first
    item.wait_for()
    item.click()


def answer_kernel_question(page: Page) -> None:
    """JupyterLab sometimes asks which kernel to start (seen about one run in three here); a learner picks the one
    it offers, and so does the test, saying so."""
    select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
    if select.count() and select.is_visible():
        print("JupyterLab asked which kernel to start; choosing the one it offered", flush=True)
        select.click()


def set_readout(page: Page, control: str, value: int) -> None:
    """Type a value into a slider's number, as a learner can."""
    readout = page.locator(f".sdkit-{control} .widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")
    expect(readout).to_have_text(str(value))


def run_until_panel(page: Page, shots: Path, *, seconds: float, opened: str, retry_shot: str) -> None:
    """Wait for the notebook and its kernel, Run All Cells from the menu, and wait until the panel shows a picture
    (answering a kernel question, and choosing Run All again once if nothing ran after 30 s, as a learner would)."""
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.get_by_text(re.compile(r"\(ipykernel\) \| Idle")).wait_for(timeout=120_000)  # the kernel is connected
    page.screenshot(path=shots / opened)
    run_all(page)
    deadline, retried = time.monotonic() + seconds, False
    while not page.locator(".sdkit-panel .sdkit-gallery-item").count():
        assert time.monotonic() < deadline, f"no panel with a picture {seconds} s after Run All Cells"
        answer_kernel_question(page)
        first_prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first.inner_text()
        if not retried and time.monotonic() > deadline - seconds + 30 and "[ ]" in first_prompt:
            print("nothing ran 30 s after Run All Cells; choosing it again, as a learner would", flush=True)
            page.screenshot(path=shots / retry_shot)
            run_all(page)
            retried = True
        page.wait_for_timeout(500)


@contextlib.contextmanager
def failure_report(page: Page, shots: Path, lab, name: str):
    """On a failure: a screenshot and the end of JupyterLab's log, then the failure itself."""
    try:
        yield
    except BaseException:
        page.screenshot(path=shots / name)
        print(f"failed: see {shots / name}; JupyterLab's log ends:\n" + (lab[2] / "lab.log").read_text()[-3000:],
              flush=True)
        raise
