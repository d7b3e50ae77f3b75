"""JupyterLab in a real browser: run notebook 09, then use its panel's fast-mode group as a learner would: open the
group, set token merging to 0.25, turn fast mode off (`make browser-test`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from steps import failure_report, gallery_count, newest_parameters, run_until_panel, set_readout, wait_gallery

NOTEBOOK = "09_speed_on_a_cpu.ipynb"
RUN_ALL_S = 360  # notebook 09 takes ~90 s on 2 cores, timing UNet steps; a slow CI machine gets room
STEP_S = 60


@pytest.fixture(scope="module")
def page(open_page, shots):
    with open_page(NOTEBOOK, profile="chromium-profile-09") as page:
        yield page


def test_learner_dials_fast_mode(page: Page, shots: Path, lab):
    with failure_report(page, shots, lab, "fast-failure.png"):
        session(page, shots)


def session(page: Page, shots: Path) -> None:
    # 1. Open notebook 09 and run every cell: its panel starts with fast mode on.
    run_until_panel(page, shots, seconds=RUN_ALL_S, opened="fast-00-opened.png", retry_shot="fast-00b-nothing-ran.png")
    panel = page.locator(".sdkit-panel")
    panel.scroll_into_view_if_needed()
    assert "Error displaying widget" not in page.content()
    first = newest_parameters(page)
    assert "DeepCache: 2" in first and "Token merging ratio: 0.5" in first, first
    panel.screenshot(path=shots / "fast-01-after-run-all.png")

    # 2. Open the fast-mode group, as a learner clicks its title: the switch is on and the trades are named.
    panel.get_by_text("Fast mode", exact=True).first.click()
    switch = page.locator(".sdkit-fast-switch input")
    expect(switch).to_be_checked()
    expect(page.locator(".sdkit-fast-trades")).to_contain_text("tokens in the largest self-attention")

    # 3. Token merging to 0.25: a new picture arrives by itself and records it.
    before = gallery_count(page)
    set_readout(page, "fast-token-merging", "0.25")
    wait_gallery(page, before + 1, timeout_s=STEP_S)
    assert "Token merging ratio: 0.25" in newest_parameters(page), newest_parameters(page)
    panel.screenshot(path=shots / "fast-02-token-merging-0.25.png")

    # 4. Fast mode off: every trade goes back, and the next picture records none of them.
    before = gallery_count(page)
    switch.click()
    expect(page.locator(".sdkit-fast-token-merging .widget-readout")).to_have_text("0.00")
    wait_gallery(page, before + 1, timeout_s=STEP_S)
    last = newest_parameters(page)
    assert "DeepCache" not in last and "Token merging" not in last and "CFG until" not in last, last
    panel.screenshot(path=shots / "fast-03-off.png")
    assert "Error displaying widget" not in page.content()
