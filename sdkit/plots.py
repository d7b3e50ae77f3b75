"""Pictures for the notebooks: image grids, bar charts, sweeps (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from PIL import Image


def _shown_once(fig: Figure) -> Figure:
    """Close the figure in pyplot, so Jupyter shows it once: as the value a cell returns, not again at the cell's end."""
    plt.close(fig)
    return fig


def bars(values: dict[str, float], *, title: str, unit: str) -> Figure:
    """A horizontal bar chart of named measurements, each labelled with its value."""
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(values)))
    names = list(values)
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    for i, name in enumerate(names):
        value = values[name]
        ax.text(value, i, f" {value:.0f} {unit}" if value >= 100 else f" {value:.3g} {unit}", va="center")
    ax.set_xlabel(unit)
    ax.set_title(title)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values.values()) * 1.3)
    fig.tight_layout()
    return _shown_once(fig)


def grid(images: Sequence[Image.Image], *, labels: Sequence[str] = (), cols: int = 4, title: str = "",
         size: float = 1.6) -> Figure:
    """Images in a grid, each with an optional label underneath."""
    rows = max(1, -(-len(images) // cols))
    lines = max((label.count("\n") + 1 for label in labels), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * (size + 0.2 + 0.16 * lines) + 0.3 * bool(title)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
            if i < len(labels):
                ax.set_title(labels[i], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _shown_once(fig)


def sweep(xs: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str,
          title: str = "") -> Figure:
    """Lines of measured values against one swept setting."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _shown_once(fig)
