"""Running a grid: read top to bottom.

    check the store -> skip cells already FINISHED (by hash) -> open the parent run ->
    run each remaining cell (here in this process; on Ray through the same `run_cell`) ->
    log seed groups -> close the parent run

`run_cell` never raises for a failing cell: the cell ends FAILED in MLflow with the
reason in `forgetless.error`, and the grid goes on.
"""

from __future__ import annotations

import contextlib
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
from forgetless.experiments.base_model import prepare_stream
from forgetless.experiments.config import Cell, Grid, build_params
from forgetless.experiments.evaluate import PRIMARY, final_scores, score_stream, step_scores
from forgetless.models import build_model, model_factory
from forgetless.strategies import Strategy, TrainConfig, strategy_class
from forgetless.streams import Stream, build_stream, stream_factory

log = logging.getLogger(__name__)


@dataclass
class CellOutcome:
    cell_hash: str
    label: str
    status: str  # FINISHED | FAILED | SKIPPED | HELD (by another driver) | UNLOGGED
    summary: dict[str, float] = field(default_factory=dict)
    error: str = ""
    recorded: bool = True  # False when the worker died and could not record the failure
    notes: list[str] = field(default_factory=list)  # what the driver should say about it
    run_id: str = ""


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
    stream = prepare_stream(stream, model, cfg["model"])
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
    run_id: str | None = None,
) -> CellOutcome:
    """Train and score one cell into MLflow run `run_id` (which its driver claimed; a new
    run when None), checkpointing after every experience and resuming from it.

    A worker that dies leaves the last checkpoint, and the retried call resumes there. A
    store that stops answering leaves it too, with the metrics not yet written, and the
    next submission logs them (UNLOGGED). An exception ends the cell FAILED and removes
    the checkpoint, so that resubmitting the grid retries it from the start in a new run
    while the FAILED run keeps its reason. A FINISHED cell needs no checkpoint.
    """
    if threads:
        torch.set_num_threads(threads)
    device = device or default_device()
    path = checkpoint_path(storage, cell)
    run, notes = None, []
    try:
        _reset_peak_memory(torch.device(device))
        stream, strategy = build_cell(cell, device)
        T = len(stream)
        state = _resumable_state(path, grid_run, run_id, notes) if strategy.resumable else None
        if state is not None:
            strategy.load_state_dict(state["strategy"])
            checkpoint.set_rng_state(state["rng"])
            R, baseline = state["R"].numpy(), state["baseline"].tolist()
            base_general = state["base_general"]
            extra = {} if state["general"] is None else {"general_acc": state["general"]}
            start, train_time = state["next"], state["train_time_s"]
            run = tracking.CellRun(
                grid_run, state["run_id"], cell, stream.manifest(), state["pending_metrics"]
            )
            log.info("%s: resuming at experience %d of %d", cell.label(), start, T)
            if start == T:  # trained before the store stopped answering: score it again
                _, extra = score_stream(strategy, stream)
        else:
            baseline, extra = score_stream(strategy, stream)
            base_general = extra.get("general_acc")
            run = tracking.CellRun.fresh(grid_run, run_id, cell, stream.manifest())
            R, start, train_time = np.full((T, T), np.nan), 0, 0.0
        for note in notes:
            run.warn(note)
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
                **step_scores(R, i, extra, stream),
            })  # fmt: skip
            _warn_if_untrained(run, cell, experience, R[i, i])
            if strategy.resumable:
                checkpoint.save(path, {
                    "strategy": strategy.state_dict(), "rng": checkpoint.rng_state(),
                    "R": torch.from_numpy(R),
                    "baseline": torch.tensor(baseline, dtype=torch.float64),  # as R: exact
                    "next": i + 1, "train_time_s": train_time, "run_id": run.run_id,
                    "tracking_uri": grid_run.tracking_uri,
                    "base_general": base_general, "general": extra.get("general_acc"),
                    "pending_metrics": run.pending(),
                })  # fmt: skip
        summary = metrics.summarize(R, baseline)
        summary.update(train_time_s=train_time, memory_bytes=strategy.memory_bytes())
        summary.update(_peak_memory(strategy.device))
        flag = diverged(strategy.model, stream, R)
        if flag:
            log.warning("%s: %s", cell.label(), flag)
            run.tag("flag", flag)
            notes.append(f"flagged: {flag}")
        final = final_scores(strategy, stream, extra, base_general, train_time)
        summary.update(final.summary)
        for name, rows in final.tables.items():
            run.log_table(rows, name)
        for message in final.warnings:
            log.warning("%s: %s", cell.label(), message)
            run.warn(message)
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
        checkpoint.remove(path)
        return CellOutcome(cell.hash, cell.label(), "FINISHED", summary, notes=notes,
                           run_id=run.run_id)  # fmt: skip
    except tracking.TrackingUnavailable as e:
        reason = (f"{e}; what it trained is kept in {path} and is logged when the grid "
                  "is run again")  # fmt: skip
        log.error("%s not logged: %s", cell.label(), reason)
        return CellOutcome(cell.hash, cell.label(), "UNLOGGED", error=reason, notes=notes)
    except Exception as e:  # noqa: BLE001 - a failing cell must not stop the grid
        reason = f"{type(e).__name__}: {e}"
        log.error("%s failed: %s\n%s", cell.label(), reason, traceback.format_exc())
        checkpoint.remove(path)
        outcome = record_failure(cell, grid_run, reason, run.run_id if run else run_id)
        outcome.notes = notes
        return outcome


def _resumable_state(
    path: str, grid_run: tracking.GridRun, run_id: str | None, notes: list[str]
) -> dict | None:
    """The cell's checkpoint if it belongs to `run_id` (or, with none given, to a live run
    of this store); one that does not is set aside, with a note saying why."""
    try:
        state = checkpoint.load(path)
    except checkpoint.UnreadableCheckpoint as e:
        aside = checkpoint.set_aside(path, "unreadable")
        notes.append(f"{e}; moved to {aside}; the cell starts from scratch")
        return None
    if state is None:
        return None
    owner = state.get("run_id")
    if run_id is None and tracking.run_is_open(grid_run.tracking_uri, owner):
        return state
    if owner == run_id:
        return state
    aside = checkpoint.set_aside(path, "stale")
    store = state.get("tracking_uri", "an earlier store")
    notes.append(f"checkpoint {path} belongs to run {owner} of {store}, not to this store's "
                 f"run of the cell (another store, or a deleted run); moved to {aside}; the "
                 "cell starts from scratch")  # fmt: skip
    return None


NEAR_CHANCE = 0.05  # of the way from chance to a perfect score


def diverged(model: torch.nn.Module, stream: Stream, R: np.ndarray) -> str:
    """Why a cell's results are not to be ranked ('' if they are): non-finite parameters,
    or experiences learnt no better than chance right after training on them (within
    NEAR_CHANCE: a diverged SGD run scores a hair above chance by luck).

    Chance is judged on R[i][i], not on the final row: a naive learner in a
    class-incremental stream forgets old classes below chance, and that is a result."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return "non-finite parameters (the loss exploded)"
    classes = [e.info.get("classes") for e in stream.experiences]
    if not all(classes):
        return ""
    chance = float(np.mean([1.0 / len(c) for c in classes]))
    learning = float(np.mean(np.diag(R)))
    if learning <= chance + NEAR_CHANCE * (1 - chance):
        return f"learning accuracy {learning:.3f}: no better than chance ({chance:.3f})"
    return ""


def record_failure(
    cell: Cell, grid_run: tracking.GridRun, reason: str, run_id: str | None = None
) -> CellOutcome:
    """End the cell's run FAILED with `reason` (creating the run if it never started)."""
    try:
        tracking.CellRun.fresh(grid_run, run_id, cell, [], reuse=True).fail(reason)
    except Exception:  # noqa: BLE001 - the store itself failed; report in the terminal
        log.exception("could not record the failure of %s in MLflow", cell.label())
    return CellOutcome(cell.hash, cell.label(), "FAILED", error=reason, run_id=run_id or "")


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


def _warn_if_untrained(run: tracking.CellRun, cell: Cell, experience, score: float) -> None:
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
        run.warn(message)


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
    outcomes: list[CellOutcome] = []

    def report(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    done = tracking.finished_cells(tracking_uri, grid.name)
    for cell in grid.cells:
        if cell.hash in done:
            report(CellOutcome(cell.hash, cell.label(), "SKIPPED"))
    todo = [c for c in grid.cells if c.hash not in done]
    if not todo:
        return outcomes
    grid_run = tracking.open_grid(tracking_uri, grid.name, len(grid.cells), grid.source)
    with tracking.Heartbeat(grid_run):
        claims = tracking.claim_cells(grid_run, todo)
        for cell in todo:
            if cell.hash in claims.finished:
                report(CellOutcome(cell.hash, cell.label(), "SKIPPED"))
            elif cell.hash in claims.held:
                report(CellOutcome(cell.hash, cell.label(), "HELD",
                                   error=f"run by {claims.held[cell.hash]}"))  # fmt: skip
        runnable = [c for c in todo if c.hash in claims.runs]

        def one(cell: Cell, device: str | None = None, threads: int | None = None):
            return run_cell(cell, grid_run, grid.storage, device, threads, claims.runs[cell.hash])

        ended: set[str] = set()
        try:
            for outcome in executor(runnable, one):
                if not outcome.recorded:
                    run_id = claims.runs[outcome.cell_hash]
                    cell = next(c for c in runnable if c.hash == outcome.cell_hash)
                    outcome = record_failure(cell, grid_run, outcome.error, run_id)
                ended.add(outcome.cell_hash)
                report(outcome)
        except BaseException:  # Ctrl-C or a dying driver: end its runs KILLED, then stop
            with contextlib.suppress(Exception):
                tracking.release(grid_run, [r for h, r in claims.runs.items() if h not in ended])
                tracking.close_grid(grid_run, "KILLED")
            raise
    if len(outcomes) != len(grid.cells):
        raise RuntimeError(f"{len(grid.cells)} cells expanded but {len(outcomes)} reported back")
    from forgetless.experiments.compare import log_seed_groups

    with tracking.store_lock(tracking_uri):
        tracking.retrying(log_seed_groups, grid_run, grid.name)
    failed = sum(o.status in ("FAILED", "UNLOGGED") for o in outcomes)
    tracking.close_grid(grid_run, "FAILED" if failed else "FINISHED", failed)
    return outcomes
