"""Running a grid: read top to bottom.

    check the store -> skip cells already FINISHED (by hash) -> open the parent run ->
    run each remaining cell (here in this process; on Ray through the same `run_cell`) ->
    log seed groups -> close the parent run

`run_cell` never raises for a failing cell: the cell ends FAILED in MLflow with the
reason in `forgetless.error`, and the grid goes on.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from forgetless.experiments import checkpoint, metrics, tracking
from forgetless.experiments.config import Cell, Grid, build_params
from forgetless.experiments.editing import applied_scores, edit_results, edit_summary
from forgetless.experiments.evaluate import PRIMARY, score_stream
from forgetless.models import build_model, model_factory
from forgetless.strategies import Strategy, TrainConfig, strategy_class
from forgetless.streams import Stream, build_stream, stream_factory

log = logging.getLogger(__name__)


@dataclass
class CellOutcome:
    cell_hash: str
    label: str
    status: str  # FINISHED | FAILED | SKIPPED
    summary: dict[str, float] = field(default_factory=dict)
    error: str = ""
    recorded: bool = True  # False when the worker died and could not record the failure


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_cell(cell: Cell, device: str | torch.device) -> tuple[Stream, Strategy]:
    """Seed every RNG from the cell seed, then build stream, model and strategy."""
    checkpoint.seed_everything(cell.seed)
    cfg = cell.config
    stream_name, model_name = cfg["stream"]["name"], cfg["model"]["name"]
    stream_config = typing.get_type_hints(stream_factory(stream_name, "stream"))["config"]
    stream = build_stream(
        stream_name, build_params(stream_config, cfg["stream"], "stream"), cell.seed
    )
    model_config = typing.get_type_hints(model_factory(model_name, "model"))["config"]
    model_params = build_params(model_config, cfg["model"], "model")
    if stream.base is not None:
        # The base is cached once for all cells: its initialisation must not depend on
        # which cell's seed happened to train it first.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(model_name, model_params, stream).to(device)
    else:
        model = build_model(model_name, model_params, stream).to(device)
    if stream.kind in ("generation", "edit"):
        from forgetless.experiments.base_model import encode_stream, load_or_train_base
        from forgetless.experiments.editing import encode_edit_stream

        if stream.base is not None:
            load_or_train_base(model, stream.base, cfg["model"])
        # An edit stream caches the model's locality answers here, before any edit.
        encode = encode_edit_stream if stream.kind == "edit" else encode_stream
        stream = encode(stream, model)
    cls = strategy_class(cfg["strategy"]["name"], "strategy")
    params = build_params(cls.Config, cfg["strategy"], "strategy")
    train = build_params(TrainConfig, cfg["train"], "train")
    return stream, cls(model, params, train, stream)


def checkpoint_path(storage: str, cell: Cell) -> str:
    """Where a cell's checkpoint lives: a local path or a URI every worker can reach."""
    return f"{storage.rstrip('/')}/{cell.grid}/{cell.hash}/checkpoint.pt"


def run_cell(
    cell: Cell,
    grid_run: tracking.GridRun,
    storage: str,
    device: str | None = None,
    threads: int | None = None,
) -> CellOutcome:
    """Train and score one cell, checkpointing after every experience and resuming from it.

    A worker that dies leaves the last checkpoint, and the retried call resumes there. An
    exception ends the cell FAILED and removes its checkpoint, so that resubmitting the
    grid retries it from the start in a new run while the FAILED run keeps its reason.
    """
    if threads:
        torch.set_num_threads(threads)
    device = device or default_device()
    path = checkpoint_path(storage, cell)
    run = None
    try:
        _reset_peak_memory(torch.device(device))
        stream, strategy = build_cell(cell, device)
        T = len(stream)
        state = checkpoint.load(path) if strategy.resumable else None
        if state is not None:
            strategy.load_state_dict(state["strategy"])
            checkpoint.set_rng_state(state["rng"])
            R, baseline = state["R"].numpy(), state["baseline"].tolist()
            base_general = state["base_general"]
            extra = {} if state["general"] is None else {"general_acc": state["general"]}
            start, train_time = state["next"], state["train_time_s"]
            run = tracking.CellRun.resume(
                grid_run, state["run_id"], cell, stream.manifest(), state["pending_metrics"]
            )
            log.info("%s: resuming at experience %d of %d", cell.label(), start, T)
        else:
            baseline, extra = score_stream(strategy, stream)
            base_general = extra.get("general_acc")
            run = tracking.CellRun.start(grid_run, cell, stream.manifest())
            R, start, train_time = np.full((T, T), np.nan), 0, 0.0
        for i in range(start, T):
            experience = stream.experiences[i]
            tick = _clock(strategy.device)
            strategy.train(experience)
            tock = _clock(strategy.device)
            row, extra = score_stream(strategy, stream)
            R[i] = row
            eval_time = _clock(strategy.device) - tock
            train_time += tock - tick
            run.log_step(i, row, {
                "avg_acc": metrics.average_accuracy_after(R, i),
                "memory_bytes": strategy.memory_bytes(),
                "trainable_fraction": trainable_fraction(strategy.model),
                "train_time_s": tock - tick,
                "eval_time_s": eval_time,
                **extra,
                **(applied_scores(R, i, extra, stream) if stream.kind == "edit" else {}),
            })  # fmt: skip
            _warn_if_untrained(run, cell, experience, R[i, i])
            if strategy.resumable:
                checkpoint.save(path, {
                    "strategy": strategy.state_dict(), "rng": checkpoint.rng_state(),
                    "R": torch.from_numpy(R), "baseline": torch.tensor(baseline),
                    "next": i + 1, "train_time_s": train_time, "run_id": run.run_id,
                    "base_general": base_general, "general": extra.get("general_acc"),
                    "pending_metrics": run.pending(),
                })  # fmt: skip
        summary = metrics.summarize(R, baseline)
        summary.update(train_time_s=train_time, memory_bytes=strategy.memory_bytes())
        summary.update(_peak_memory(strategy.device))
        if stream.kind == "edit":
            summary.update(edit_summary(extra, stream, train_time))
            run.client.log_table(run.run_id, edit_results(strategy, stream), "edits.json")
        if base_general:
            summary["general_retention"] = extra["general_acc"] / base_general
        elif base_general is not None:
            message = "the base model scores 0 on its general set: general_retention undefined"
            log.warning("%s: %s", cell.label(), message)
            run.client.set_tag(run.run_id, "forgetless.warning", message)
        names = [e.name for e in stream]
        matrix = {"experiences": names, "R": R.tolist(), "baseline": baseline,
                  "score": PRIMARY[stream.kind]}  # fmt: skip
        # Imported here: at module level, every Ray worker would import matplotlib before
        # its first cell could start.
        from forgetless.experiments.plots import accuracy_heatmap

        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "accuracy_matrix.json").write_text(json.dumps(matrix))
            accuracy_heatmap(R, names, cell.label(), Path(folder, "accuracy_matrix.png"))
            run.finish(summary, Path(folder))
        return CellOutcome(cell.hash, cell.label(), "FINISHED", summary)
    except Exception as e:  # noqa: BLE001 - a failing cell must not stop the grid
        reason = f"{type(e).__name__}: {e}"
        log.error("%s failed: %s\n%s", cell.label(), reason, traceback.format_exc())
        checkpoint.remove(path)
        return record_failure(cell, grid_run, reason, run)


def record_failure(
    cell: Cell, grid_run: tracking.GridRun, reason: str, run: tracking.CellRun | None = None
) -> CellOutcome:
    """End the cell's run FAILED with `reason` (creating the run if it never started)."""
    try:
        if run is None:
            run = tracking.CellRun.start(grid_run, cell, [])
        run.fail(reason)
    except Exception:  # noqa: BLE001 - the store itself failed; report in the terminal
        log.exception("could not record the failure of %s in MLflow", cell.label())
    return CellOutcome(cell.hash, cell.label(), "FAILED", error=reason)


def trainable_fraction(model: torch.nn.Module) -> float:
    """Share of the model's parameters that training updates (HFT ~0.5, LoRA ~0.01)."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable / total


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The most GPU memory the cell held at once (since it started or resumed), to size
    `resources.gpu` fractions by (EasyEdit users ask for such a table); none on CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def _warn_if_untrained(run, cell: Cell, experience, score: float) -> None:
    """A just-trained experience near chance means a broken loader or lr (Mammoth #41)."""
    classes = experience.info.get("classes")
    if not classes:
        return
    chance = 1.0 / len(classes)
    if score <= chance:
        message = (
            f"experience {experience.name!r} scores {score:.3f} right after training on it, "
            f"at or below chance ({chance:.3f})"
        )
        log.warning("%s: %s", cell.label(), message)
        run.client.set_tag(run.run_id, "forgetless.warning", message)


Executor = Callable[[list[Cell], Callable[[Cell], CellOutcome]], Iterable[CellOutcome]]


def local_executor(cells: list[Cell], fn: Callable[[Cell], CellOutcome]) -> Iterator[CellOutcome]:
    """Cells one after another in this process (the Ray executor has the same shape)."""
    for cell in cells:
        yield fn(cell)


def run_grid(
    grid: Grid,
    tracking_uri: str,
    executor: Executor = local_executor,
    on_outcome: Callable[[CellOutcome], None] | None = None,
) -> list[CellOutcome]:
    tracking.check_tracking_uri(tracking_uri)
    checkpoint.check_writable(grid.storage)
    done = tracking.finished_cells(tracking_uri, grid.name)
    todo = [c for c in grid.cells if c.hash not in done]
    outcomes = [CellOutcome(c.hash, c.label(), "SKIPPED") for c in grid.cells if c.hash in done]
    for outcome in outcomes:
        if on_outcome:
            on_outcome(outcome)
    if not todo:
        return outcomes
    # Runs left RUNNING by an interrupted submission: a cell with a checkpoint reopens its
    # run when it resumes, the others start a new one.
    tracking.mark_interrupted(tracking_uri, grid.name, {c.hash for c in todo})
    grid_run = tracking.open_grid(tracking_uri, grid.name, len(grid.cells), grid.source)

    def one(cell: Cell, device: str | None = None, threads: int | None = None) -> CellOutcome:
        return run_cell(cell, grid_run, grid.storage, device, threads)

    cells = {c.hash: c for c in todo}
    try:
        for outcome in executor(todo, one):
            if not outcome.recorded:
                state = checkpoint.load(checkpoint_path(grid.storage, cells[outcome.cell_hash]))
                run = None if state is None else tracking.CellRun.resume(
                    grid_run, state["run_id"], cells[outcome.cell_hash], [],
                    state["pending_metrics"],
                )  # fmt: skip
                outcome = record_failure(cells[outcome.cell_hash], grid_run, outcome.error, run)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    except BaseException:  # Ctrl-C or a dying driver: say so in the parent run, then stop
        tracking.close_grid(grid_run, "KILLED")
        raise
    if len(outcomes) != len(grid.cells):
        raise RuntimeError(f"{len(grid.cells)} cells expanded but {len(outcomes)} reported back")
    from forgetless.experiments.compare import log_seed_groups

    log_seed_groups(grid_run, grid.name)
    failed = sum(o.status == "FAILED" for o in outcomes)
    tracking.close_grid(grid_run, "FAILED" if failed else "FINISHED", failed)
    return outcomes
