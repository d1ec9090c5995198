"""Figures made with matplotlib (headless): a cell's accuracy-matrix heatmap and the report's.

Drawn with matplotlib's object API (no pyplot state, safe in worker threads). A cell draws
its heatmap once per run with a fixed layout, and so does the report's grid of heatmaps, its
largest figure: no layout pass measures their texts before they are drawn. The report's
other figures use constrained layout, solved once and then saved in each format asked
(PNG, SVG, PDF). Every function takes plain numbers, one value per seed where a figure
shows seeds: reading MLflow is the caller's business.

Experiences are numbered from 0, as the MLflow step of the metrics logged after each one.
Memory is shown in KB and MB of 1024 bytes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

# label -> (x, values with one row per seed): one curve, the mean over seeds shaded by ± std.
Curves = dict[str, tuple[np.ndarray, np.ndarray]]
FORMATS = ("png", "svg", "pdf")
EXPERIENCE_AXIS = "experience (MLflow step)"
MARKERS = "osD^vP*Xhp<>"
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
UNITS = [("MB", 1024.0**2), ("KB", 1024.0)]


@dataclass(frozen=True)
class Style:
    """How one strategy is drawn in every figure of a report."""

    color: tuple
    marker: str
    linestyle: str | tuple


def styles(labels: list[str]) -> dict[str, Style]:
    """A colour, a marker and a line style per strategy, the same in every figure.

    Strategies that forget alike (naive, EWC, LwF) draw curves on top of each other: the
    marker and the dash pattern tell them apart where colours overlap or print in grey.
    """
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {
        label: Style(cmap(i % cmap.N), MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
        for i, label in enumerate(labels)
    }


def memory_text(value: float, std: float | None = None) -> str:
    """Bytes as B, KB or MB (1024-based), the unit chosen by `value`; `std` in the same unit."""
    if value != value:  # NaN: unknown
        return "n/a"
    name, scale = next(((n, s) for n, s in UNITS if abs(value) >= s), ("B", 1.0))
    digits = 0 if scale == 1.0 else 1 if abs(value) < 100 * scale else 0
    text = f"{value / scale:,.{digits}f}"
    if std is not None and std == std:
        text += f" ± {std / scale:,.{digits}f}"
    return f"{text} {name}"


def sample_std(values: np.ndarray) -> np.ndarray:
    """The sample std over seeds (axis 0, ddof=1), as in the tables; zero for one seed."""
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])


def render(fig: Figure, formats: Sequence[str] = FORMATS) -> dict[str, bytes]:
    """The figure in each of `formats` (of FORMATS). A layout engine is solved once and then
    dropped: kept, every save would solve it again and draw the figure twice. SVG keeps its
    text as text (editable in a paper's figure, and faster to write)."""
    if fig.get_layout_engine() is not None:
        fig.get_layout_engine().execute(fig)
        fig.set_layout_engine(None)
    files = {}
    with rc_context({"svg.fonttype": "none"}):
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, metadata=_NO_DATE[fmt])
            files[fmt] = buffer.getvalue()
    return files


# Without a creation date, the same numbers give the same SVG and PDF bytes.
_NO_DATE = {"png": None, "svg": {"Date": None}, "pdf": {"CreationDate": None}}
_INHERITED: list[Figure] = []  # what forked workers render: inherited, never pickled


def render_all(figures: list[Figure], formats: Sequence[str] = FORMATS) -> list[dict[str, bytes]]:
    """`render` of each figure, in worker processes when there are idle cores for them.

    Drawing is most of a report's time and each figure draws alone. The workers are forked,
    so they inherit the figures instead of receiving them pickled, and only from a process
    with no other thread running (a fork copies no thread, and a lock another thread held
    would stay held in the child). Workers cost CPU of their own (start, copied pages,
    results sent back), so they run only while a core beyond this process is idle (the
    load average over the last minute below the cores less one): on a busy machine they
    would wait for the same cores. Elsewhere the figures render here, one after another.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(len(figures), cores or 1)
    idle = os.getloadavg()[0] < workers - 1 if hasattr(os, "getloadavg") else False
    forkable = "fork" in multiprocessing.get_all_start_methods()
    if workers < 2 or not idle or not forkable or threading.active_count() > 1:
        return [render(fig, formats) for fig in figures]
    # The vector backends load on first use, fontTools with them: once here, not per worker.
    if "pdf" in formats:
        from matplotlib.backends import backend_pdf  # noqa: F401
    if "svg" in formats:
        from matplotlib.backends import backend_svg  # noqa: F401

    _INHERITED[:] = figures
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(_render_inherited, range(len(figures)), [formats] * len(figures)))
    finally:
        _INHERITED.clear()


def _render_inherited(index: int, formats: Sequence[str]) -> dict[str, bytes]:
    return render(_INHERITED[index], formats)


def accuracy_heatmap(R, names: list[str], title: str, path: Path) -> None:
    """R[i][j]: rows = trained through experience i, columns = scored on experience j."""
    size = 1.6 + 0.5 * len(names)
    fig = Figure(figsize=(size + 1.0, size), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.14, 0.68, 0.74))
    image = _draw_matrix(ax, R, title)
    fig.colorbar(image, cax=fig.add_axes((0.87, 0.14, 0.03, 0.74)))
    fig.savefig(path)


def _draw_matrix(
    ax,
    R,
    title: str,
    ticks: list[str] | None = None,
    vmax: float = 1.0,
    cmap: str = "viridis",
    annotate: bool = True,
):
    """One matrix, with its values written in when `annotate` and it is small enough to read;
    `ticks` name the experiences (default 0..T-1)."""
    R = np.asarray(R, dtype=float)
    image = ax.imshow(R, vmin=0.0, vmax=vmax, cmap=cmap)
    if annotate and len(R) <= 12:
        for (i, j), value in np.ndenumerate(R):
            color = "black" if value > 0.6 * vmax else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    positions = range(len(R))
    ticks = ticks or [str(i) for i in positions]
    ax.set_xticks(positions, ticks, fontsize=7, rotation=90 if max(map(len, ticks)) > 3 else 0)
    ax.set_yticks(positions, ticks, fontsize=7)
    ax.set_xlabel("scored on experience j", fontsize=8)
    ax.set_ylabel("trained through experience i", fontsize=8)
    ax.set_title(title, fontsize=8, y=1.0)  # a set height: not placed clear of top ticks
    return image


def heatmap_grid(
    mean: dict[str, np.ndarray], std: dict[str, np.ndarray], ticks: list[str] | None, title: str
) -> Figure:
    """Per strategy its mean matrix over seeds and, below it, the std over seeds: the mean
    panels share one colour scale (0 to 1, its bar on the right), the std panels another
    (0 to the largest std, its bar at the bottom), so that a cell where seeds disagree
    stands out. Only the means are written in: the std panels are read by colour, and text
    is most of what a figure costs to draw.

    The panels sit at fixed places, sized from the tick labels' length: a layout engine
    would measure every text of this, the largest figure, once more before drawing it.
    """
    n = len(mean)
    blocks = -(-n // 4)  # at most 4 strategies a row, so each panel stays readable on a page
    columns = -(-n // blocks)
    T = len(next(iter(mean.values())))
    names = ticks or [str(i) for i in range(T)]
    rotated = max(map(len, names)) > 3
    label = 7 / 72 * 0.62 * max(map(len, names)) + 0.1  # inches a tick label takes
    side = 0.5 * T + 0.9  # a panel's side, inches
    left, across = 0.75 + label, 0.3 + label + side  # y label, tick labels, panel, gap
    below = 0.45 + (label if rotated else 0.15)  # tick labels and the x label under a panel
    down = 0.3 + side + below  # title, panel, what is below it
    width, height = left + columns * across + 0.9, 0.5 + 2 * blocks * down + 0.8
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)

    def place(row: int, column: int):
        x0 = left + column * across
        y0 = height - 0.5 - row * down - 0.3 - side
        return fig.add_axes((x0 / width, y0 / height, side / width, side / height))

    top = max(max(float(np.max(s)) for s in std.values()), 1e-3)
    for k, label_name in enumerate(mean):
        row, column = 2 * (k // columns), k % columns
        mean_axes, std_axes = place(row, column), place(row + 1, column)
        mean_image = _draw_matrix(mean_axes, mean[label_name], f"{label_name}: mean", ticks)
        std_image = _draw_matrix(std_axes, std[label_name], f"{label_name}: std", ticks,
                                 vmax=top, cmap="magma", annotate=False)  # fmt: skip
        if column:  # the rows are named once, left of the first column
            for ax in (mean_axes, std_axes):
                ax.tick_params(labelleft=False)
                ax.set_ylabel("")
    panels_right = left + columns * across - 0.3 - label
    low = 0.8 + below  # the lowest panel's bottom; the highest's top is 0.8 from the top
    bar = fig.add_axes(((panels_right + 0.2) / width, low / height, 0.15 / width,
                        (height - 0.8 - low) / height))  # fmt: skip
    fig.colorbar(mean_image, cax=bar, label="accuracy, mean over seeds")
    bar = fig.add_axes((left / width, 0.55 / height, 0.5 * (panels_right - left) / width,
                        0.12 / height))  # fmt: skip
    fig.colorbar(std_image, cax=bar, orientation="horizontal",
                 label="accuracy, sample std over seeds")  # fmt: skip
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    return fig


def curve_panels(panels: dict[str, Curves], styles: dict[str, Style], xlabel: str,
                 title: str) -> Figure:  # fmt: skip
    """One panel per metric, one line per strategy: the mean over seeds, shaded ± std, with
    each seed's value as a small hollow marker beside it (strategies side by side, so the
    seeds of curves that coincide do not hide each other)."""
    fig = _figure((4.6 * len(panels) + 1.6, 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, curves) in zip(axes, panels.items()):
        for k, (label, (x, values)) in enumerate(curves.items()):
            style = styles[label]
            mean, std = values.mean(axis=0), sample_std(values)
            ax.plot(x, mean, color=style.color, marker=style.marker, markersize=4,
                    linestyle=style.linestyle, label=label)  # fmt: skip
            ax.fill_between(x, mean - std, mean + std, color=style.color, alpha=0.15, lw=0)
            offset = 0.05 * (k - (len(curves) - 1) / 2)
            for seed_values in values:
                ax.scatter(x + offset, seed_values, s=10, marker=style.marker, alpha=0.6,
                           facecolors="none", edgecolors=[style.color], linewidths=0.7)  # fmt: skip
        ax.set_xticks(x)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
                    title="line: mean; hollow: seeds", title_fontsize=7)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    return fig


def trade_off(
    points: dict[str, tuple[np.ndarray, np.ndarray]],
    styles: dict[str, Style],
    xlabel: str,
    ylabel: str,
    title: str,
    better: str,
    memory_axis: bool = False,
) -> Figure:
    """Per strategy, (x, y) of each seed as hollow markers and their mean with error bars of
    ± std over seeds. `better` names the corner where a strategy would rather be, e.g.
    "lower right". `memory_axis`: x is bytes, drawn symlog (so 0 bytes shows) in KB and MB.
    """
    fig = _figure((7.6, 4.4))
    ax = fig.add_subplot()
    for label, (xs, ys) in points.items():
        style = styles[label]
        ax.errorbar(np.mean(xs), np.mean(ys), xerr=_std(xs), yerr=_std(ys), fmt=style.marker,
                    markersize=7, capsize=3, color=style.color, label=label)  # fmt: skip
        ax.scatter(xs, ys, s=18, marker=style.marker, facecolors="none",
                   edgecolors=[style.color], alpha=0.7, linewidths=0.8)  # fmt: skip
    if memory_axis:  # 0 bytes is a real value (naive): linear below 1 KB, log above
        ax.set_xscale("symlog", linthresh=1024)
        top = max(1024.0, max(float(np.max(xs)) for xs, _ in points.values()))
        ticks = [0.0]  # 1, 10, 100 KB, 1, 10, 100 MB, ... up to the largest value
        while ticks[-1] < top:
            k = len(ticks) - 1
            ticks.append(1024.0 ** (1 + k // 3) * 10 ** (k % 3))
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _round_memory(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
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
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
              title="filled: mean ± std; hollow: seeds", title_fontsize=7)  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def bars(
    values: dict[str, np.ndarray], styles: dict[str, Style], xlabel: str, title: str
) -> Figure:
    """Horizontal bars, one per strategy: the mean over seeds with a ± std whisker, and
    each seed's value as a hollow marker on its bar."""
    labels = list(values)
    fig = _figure((6.4, 0.9 + 0.45 * len(labels)))
    ax = fig.add_subplot()
    means = [np.mean(values[label]) for label in labels]
    stds = [_std(values[label]) for label in labels]
    ax.barh(labels, means, xerr=stds, capsize=3, color=[styles[label].color for label in labels],
            alpha=0.8)  # fmt: skip
    for position, label in enumerate(labels):
        seeds = np.asarray(values[label])
        ax.scatter(seeds, np.full(len(seeds), position), s=18, marker=styles[label].marker,
                   facecolors="none", edgecolors="black", linewidths=0.8, zorder=3)  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def _round_memory(value: float) -> str:
    """A memory tick: "0", "10 KB", "1 MB" (no decimals on the round values ticks sit at)."""
    return memory_text(value).replace(".0 ", " ") if value else "0"


def _std(values: np.ndarray) -> float:
    return float(sample_std(np.asarray(values, dtype=float)[:, None])[0])


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig
