"""The committed notebooks are the ones the scripts in tools/notebooks/ build (nbval runs them; this checks the rest)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402

STEMS = build_notebooks.order()


def committed(stem: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)


def test_every_script_has_a_lesson_entry_and_a_notebook():
    assert STEMS and set(STEMS) == set(build_notebooks.COURSE)
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == STEMS


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_is_built_from_its_script(stem):
    built = build_notebooks.build(stem, order=STEMS)
    saved = committed(stem)
    assert [(c.cell_type, c.source) for c in saved.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"notebooks/{stem}.ipynb differs from tools/notebooks/{stem}.py: run `make notebooks`")


@pytest.mark.parametrize("stem", STEMS)
def test_saved_notebook_is_valid_and_holds_no_live_widgets(stem):
    saved = committed(stem)
    nbformat.validate(saved)
    assert "widgets" not in saved.metadata
    for cell in saved.cells:
        for output in cell.get("outputs", []):
            assert build_notebooks.WIDGET_VIEW not in output.get("data", {}), "would show 'Error displaying widget'"
            assert not (output.get("output_type") == "error"), f"{stem} was saved with an error"


@pytest.mark.parametrize("stem", STEMS)
def test_navigation_opens_and_closes_every_lesson(stem):
    cells = committed(stem).cells
    assert cells[1].source.startswith("**In this notebook you will learn**") and "Time:" in cells[1].source
    assert cells[-1].source.startswith("## Try this")
    for link in re.findall(r"\]\(([^)]+\.ipynb)\)", cells[-1].source):
        assert (ROOT / "notebooks" / link).is_file(), link
    index = STEMS.index(stem)
    if index + 1 < len(STEMS):
        assert f"({STEMS[index + 1]}.ipynb)" in cells[-1].source


@pytest.mark.parametrize("stem", [s for s in STEMS if s >= "01"])
def test_every_lesson_from_01_ends_with_the_panel(stem):
    code = [c.source for c in committed(stem).cells if c.cell_type == "code"]
    assert "widgets.Panel(" in code[-1]


def test_static_outputs_keep_the_picture_and_drop_the_live_view():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("panel")])
    nb.metadata["widgets"] = {"state": {}}
    nb.cells[0].outputs = [
        nbformat.v4.new_output("execute_result", data={"text/plain": "VBox()", "text/html": "<img/>",
                                                       build_notebooks.WIDGET_VIEW: {"model_id": "x"}}),
        nbformat.v4.new_output("display_data", data={"text/plain": "progress", build_notebooks.WIDGET_VIEW: {}})]
    out = build_notebooks.static_outputs(nb)
    assert "widgets" not in out.metadata
    assert [dict(o["data"]) for o in out.cells[0].outputs] == [{"text/html": "<img/>"}]
