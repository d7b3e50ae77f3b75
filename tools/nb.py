"""Write a notebook from a list of cells: '# md' cells are markdown, the rest code. Used to author notebooks/."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def write(path: Path, cells: list[str]) -> None:
    """Write cells (a leading '# md\\n' marks markdown) as a notebook without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for source in cells:
        source = source.strip("\n")
        if source.startswith("# md\n"):
            nb.cells.append(nbformat.v4.new_markdown_cell(source[len("# md\n"):]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source))
    nbformat.write(nb, path)


def from_script(script: Path, notebook: Path) -> None:
    """Split a script on lines '#%%' into cells and write it as a notebook."""
    write(notebook, [c for c in script.read_text().split("#%%\n") if c.strip()])


if __name__ == "__main__":
    from_script(Path(sys.argv[1]), Path(sys.argv[2]))
