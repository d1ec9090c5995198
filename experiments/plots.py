"""Figures made with matplotlib (headless): the accuracy-matrix heatmap of a cell."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(R, names: list[str], title: str = "") -> plt.Figure:
    """R[i][j]: rows = trained through experience i, columns = scored on experience j."""
    R = np.asarray(R, dtype=float)
    size = 1.2 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=80)
    image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            color = "black" if R[i, j] > 0.6 else "white"
            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ticks = range(len(names))
    ax.set_xticks(ticks, [str(j) for j in ticks])
    ax.set_yticks(ticks, [str(i) for i in ticks])
    ax.set_xlabel("scored on experience j")
    ax.set_ylabel("trained through experience i")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
