"""Figures made with matplotlib (headless): a cell's accuracy-matrix heatmap and the report's.

Drawn with matplotlib's object API (no pyplot state, safe in worker threads). A cell draws
its heatmap once per run with a fixed layout, so it costs milliseconds, not a layout pass;
the report's figures are few and use constrained layout. Every function takes plain
numbers: reading MLflow is the caller's business.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# label -> (x, mean over seeds, std over seeds): one curve, shaded by its std.
Curves = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def accuracy_heatmap(R, names: list[str], title: str, path: Path) -> None:
    """R[i][j]: rows = trained through experience i, columns = scored on experience j."""
    size = 1.6 + 0.5 * len(names)
    fig = Figure(figsize=(size + 1.0, size), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.14, 0.68, 0.74))
    image = _draw_matrix(ax, R, title)
    fig.colorbar(image, cax=fig.add_axes((0.87, 0.14, 0.03, 0.74)))
    fig.savefig(path)


def _draw_matrix(ax, R, title: str):
    R = np.asarray(R, dtype=float)
    image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    if len(R) <= 12:
        for (i, j), value in np.ndenumerate(R):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ticks = range(len(R))
    ax.set_xticks(ticks, [str(j) for j in ticks])
    ax.set_yticks(ticks, [str(i) for i in ticks])
    ax.set_xlabel("scored on experience j", fontsize=8)
    ax.set_ylabel("trained through experience i", fontsize=8)
    ax.set_title(title, fontsize=8)
    return image


def palette(labels: list[str]) -> dict[str, tuple]:
    """One colour per strategy, the same in every figure of a report."""
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def heatmap_row(matrices: dict[str, np.ndarray], title: str) -> Figure:
    """Accuracy matrices side by side on one colour scale, one panel per strategy."""
    n = len(matrices)
    rows = -(-n // 4)  # at most 4 panels a row, so each stays readable on a page
    columns = -(-n // rows)
    T = len(next(iter(matrices.values())))
    side = 1.6 + 0.5 * T
    fig = _figure((side * columns + 0.8, side * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (label, R) in zip(axes, matrices.items()):
        image = _draw_matrix(ax, R, label)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy")
    fig.suptitle(title, fontsize=10)
    return fig


def curve_panels(
    panels: dict[str, Curves], colors: dict[str, tuple], xlabel: str, title: str
) -> Figure:
    """One panel per metric, one line per strategy (mean over seeds, shaded ± std)."""
    fig = _figure((4.6 * len(panels) + 1.4, 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, curves) in zip(axes, panels.items()):
        for label, (x, mean, std) in curves.items():
            ax.plot(x, mean, marker="o", markersize=3, color=colors[label], label=label)
            ax.fill_between(x, mean - std, mean + std, color=colors[label], alpha=0.2, lw=0)
        ax.set_xticks(x)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    return fig


def trade_off(
    points: dict[str, tuple[float, float, float, float]],
    colors: dict[str, tuple],
    xlabel: str,
    ylabel: str,
    title: str,
    better: str,
    xscale: str = "linear",
) -> Figure:
    """One point per strategy at (x mean, y mean) with error bars of ± std over seeds.

    `better` names the corner where a strategy would rather be, e.g. "lower right".
    """
    fig = _figure((7.6, 4.4))
    ax = fig.add_subplot()
    for label, (x, x_std, y, y_std) in points.items():
        ax.errorbar(
            x,
            y,
            xerr=x_std,
            yerr=y_std,
            fmt="o",
            markersize=7,
            capsize=3,
            color=colors[label],
            label=label,
        )
    if xscale == "symlog":  # 0 bytes is a real value (naive): linear below 1 kB, log above
        ax.set_xscale("symlog", linthresh=1000)
        top = max(1000.0, max(x + x_std for x, x_std, _, _ in points.values()))
        ax.set_xticks([0] + [10.0**k for k in range(3, int(np.ceil(np.log10(top))) + 1)])
    vertical, horizontal = better.split()
    ax.text(
        0.98 if horizontal == "right" else 0.02,
        0.02 if vertical == "lower" else 0.98,
        f"better: {better}",
        transform=ax.transAxes,
        fontsize=8,
        color="gray",
        ha=horizontal,
        va="bottom" if vertical == "lower" else "top",
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def bars(
    values: dict[str, tuple[float, float]], colors: dict[str, tuple], xlabel: str, title: str
) -> Figure:
    """Horizontal bars, mean over seeds with a ± std whisker, one per strategy."""
    labels = list(values)
    fig = _figure((6.4, 0.9 + 0.45 * len(labels)))
    ax = fig.add_subplot()
    means = [values[label][0] for label in labels]
    stds = [values[label][1] for label in labels]
    ax.barh(labels, means, xerr=stds, capsize=3, color=[colors[label] for label in labels])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig
