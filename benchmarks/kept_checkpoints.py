"""The final checkpoint of each FINISHED cell, kept for benchmarks that read a final state.

`run_cell` drops a cell's checkpoint once the cell is FINISHED: its results are in MLflow.
compressed_replay.py and ssr.py read more of the strategy's final state than MLflow holds
(what a replay buffer stores, the codec), so they run their grids through
`keeping_final_checkpoints(executor)`: in whichever process runs a cell (this one, or a
Ray worker), the cell's last checkpoint is set aside as `<checkpoint>.final` instead of
dropped, and `final_state` loads it. This is a helper module, not a benchmark.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetless.experiments import checkpoint
from forgetless.experiments.config import Cell
from forgetless.experiments.runner import Executor, checkpoint_path

SUFFIX = "final"


def keeping_final_checkpoints(executor: Executor) -> Executor:
    """`executor` (for `run_grid`), its cells keeping their final checkpoints."""

    def execute(cells: list[Cell], fn: Callable[..., Any]):
        return executor(cells, functools.partial(_run_keeping, fn))

    return execute


def _run_keeping(fn: Callable[..., Any], cell: Cell, *args: Any, **kwargs: Any) -> Any:
    drop = checkpoint.remove
    checkpoint.remove = _set_aside  # run_cell calls it once the cell ends
    try:
        return fn(cell, *args, **kwargs)
    finally:
        checkpoint.remove = drop


def _set_aside(location: str) -> None:
    if Path(location).exists():  # local storage: the benchmarks' temporary folders
        checkpoint.set_aside(location, SUFFIX)


def final_state(storage: str, cell: Cell) -> dict[str, Any]:
    """The checkpoint the cell wrote after its last experience."""
    state = checkpoint.load(f"{checkpoint_path(storage, cell)}.{SUFFIX}")
    if state is None:
        raise RuntimeError(f"{cell.label()}: no final checkpoint; run it keeping them")
    return state
