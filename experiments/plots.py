"""Figures made with matplotlib (headless): the accuracy-matrix heatmap of a cell.

Drawn with matplotlib's object API (no pyplot state, safe in worker threads) and a fixed
layout: a cell draws one per run, so it must cost milliseconds, not a tight_layout pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def accuracy_heatmap(R, names: list[str], title: str, path: Path) -> None:
    """R[i][j]: rows = trained through experience i, columns = scored on experience j."""
    R = np.asarray(R, dtype=float)
    size = 1.6 + 0.5 * len(names)
    fig = Figure(figsize=(size + 1.0, size), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.14, 0.68, 0.74))
    image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    if len(names) <= 12:
        for (i, j), value in np.ndenumerate(R):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ticks = range(len(names))
    ax.set_xticks(ticks, [str(j) for j in ticks])
    ax.set_yticks(ticks, [str(i) for i in ticks])
    ax.set_xlabel("scored on experience j", fontsize=8)
    ax.set_ylabel("trained through experience i", fontsize=8)
    ax.set_title(title, fontsize=7)
    fig.colorbar(image, cax=fig.add_axes((0.87, 0.14, 0.03, 0.74)))
    fig.savefig(path)
