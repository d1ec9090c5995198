"""MLflow tracking, exactly as DESIGN.md's naming contract says.

One experiment per grid, one parent run per submission (`forgetless.role=grid`), one
child run per cell (`forgetless.role=cell`), and one group run per (stream, strategy,
grid point) with mean and std over seeds (`forgetless.role=group`). Values are logged
with `MlflowClient.log_batch`: one call per experience, not one per value. The tracker
never knows which strategy ran; it receives plain numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.entities import Experiment, Metric, Param, RunTag

from forgetless.experiments.config import Cell
from forgetless.experiments.config import flatten as config_flatten
from forgetless.experiments.schema import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "forgetless."
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_uri(uri: str) -> None:
    """Fail before any cell starts if the store cannot be reached or created."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]).expanduser()
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(
                f"--tracking-uri {uri!r}: folder {str(folder)!r} does not exist or is not "
                "writable; create it or point the URI elsewhere"
            )
    elif parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(
                f"--tracking-uri {uri!r}: no MLflow server answers ({e}); start one with "
                "`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 "
                "--port 5000` or fix the address"
            ) from e


def artifact_location(uri: str, grid_name: str) -> str | None:
    """Artifacts beside a local SQLite store; a server uses its own artifact root."""
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        return (store.parent / "mlartifacts" / grid_name).as_uri()
    return None


@dataclass
class GridRun:
    """What a worker needs to log a cell: handed from the driver, so nesting holds."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def open_grid(uri: str, grid_name: str, n_cells: int, grid_source: dict[str, Any]) -> GridRun:
    """Create the store, the experiment and the parent run before any worker logs."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    if experiment is None:
        experiment_id = client.create_experiment(
            grid_name, artifact_location=artifact_location(uri, grid_name)
        )
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=f"{grid_name} ({time.strftime('%Y-%m-%d %H:%M:%S')})",
        tags={f"{TAG}role": "grid", f"{TAG}grid": grid_name, f"{TAG}cells": str(n_cells)},
    )
    client.log_text(run.info.run_id, yaml.safe_dump(grid_source, sort_keys=False), "grid.yaml")
    return GridRun(uri, experiment_id, run.info.run_id)


def close_grid(grid_run: GridRun, status: str, failed: int = 0) -> None:
    client = MlflowClient(grid_run.tracking_uri)
    client.set_tag(grid_run.parent_run_id, f"{TAG}failed_cells", str(failed))
    client.set_terminated(grid_run.parent_run_id, status)


def mark_interrupted(uri: str, grid_name: str, cell_hashes: set[str]) -> None:
    """End as KILLED the RUNNING runs of these cells, left by an interrupted submission."""
    client = MlflowClient(uri)
    try:
        runs = cell_runs(uri, grid_name, status="RUNNING")
    except ConfigError:  # no experiment yet
        return
    for run in runs:
        if run.data.tags.get(f"{TAG}cell_hash") in cell_hashes:
            client.set_tag(run.info.run_id, f"{TAG}interrupted", "true")
            client.set_terminated(run.info.run_id, "KILLED")


def finished_cells(uri: str, grid_name: str) -> dict[str, str]:
    """cell hash -> run id of every FINISHED cell run of this grid (for resubmission)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    if experiment is None:
        return {}
    runs = _search_all(
        client,
        experiment.experiment_id,
        f"tags.`{TAG}role` = 'cell' and attributes.status = 'FINISHED'",
    )
    return {r.data.tags[f"{TAG}cell_hash"]: r.info.run_id for r in runs}


def grid_experiment(uri: str, grid_name: str) -> Experiment:
    """The grid's MLflow experiment; a name not in the store is an error listing the grids."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise ConfigError(
            f"no grid named {grid_name!r} in {uri}; grids there: {', '.join(names) or '(none)'}"
            " (or run the grid first)"
        )
    return experiment


def cell_runs(uri: str, grid_name: str, status: str | None = "FINISHED") -> list:
    client = MlflowClient(uri)
    experiment = grid_experiment(uri, grid_name)
    query = f"tags.`{TAG}role` = 'cell'"
    if status:
        query += f" and attributes.status = '{status}'"
    return _search_all(client, experiment.experiment_id, query)


def _search_all(client: MlflowClient, experiment_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class CellRun:
    """The MLflow run of one cell, logged in a few batched calls.

    A run is created RUNNING at the start; parameters and per-step metrics are buffered
    and written with one `log_batch` at most every FLUSH_SECONDS and at the end, with the
    artifacts in one upload. A short cell thus costs four store calls in all, and a long
    one shows progress every few seconds. What is not yet written travels in the cell's
    checkpoint (`pending`), so a killed worker loses no metric.
    """

    FLUSH_SECONDS = 10.0

    def __init__(self, grid_run: GridRun, run_id: str, cell: Cell, manifest: list[dict]) -> None:
        self.client = MlflowClient(grid_run.tracking_uri)
        self.run_id = run_id
        self.cell = cell
        self.manifest = manifest
        self.params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(cell.config).items()]
        self.metrics: list[Metric] = []
        self.flushed_at = time.monotonic()

    @classmethod
    def start(cls, grid_run: GridRun, cell: Cell, manifest: list[dict]) -> CellRun:
        tags = {
            "mlflow.parentRunId": grid_run.parent_run_id,
            f"{TAG}role": "cell",
            f"{TAG}cell_hash": cell.hash,
            f"{TAG}grid": cell.grid,
            f"{TAG}stream": cell.stream,
            f"{TAG}strategy": cell.strategy,
            f"{TAG}seed": str(cell.seed),
            f"{TAG}variant": cell.variant or "-",
        }
        # Grid keys as tags too, so flat filters work without the nesting UI.
        tags.update({f"{TAG}grid.{k}": str(v) for k, v in cell.overrides.items()})
        client = MlflowClient(grid_run.tracking_uri)
        run = client.create_run(grid_run.experiment_id, run_name=cell.label(), tags=tags)
        return cls(grid_run, run.info.run_id, cell, manifest)

    @classmethod
    def resume(cls, grid_run: GridRun, run_id: str, cell: Cell, manifest: list[dict],
               pending: list[tuple]) -> CellRun:  # fmt: skip
        """Reopen the run of an interrupted cell with the metrics it had not yet written."""
        self = cls(grid_run, run_id, cell, manifest)
        self.client.update_run(run_id, status="RUNNING")
        self.metrics = [Metric(*m) for m in pending]
        return self

    def log_step(self, step: int, row: list[float], values: dict[str, float]) -> None:
        """Metrics after experience `step`: its accuracy row and named values."""
        now = int(time.time() * 1000)
        self.metrics += [Metric(f"acc/exp_{j}", float(v), now, step) for j, v in enumerate(row)]
        self.metrics += [Metric(k, float(v), now, step) for k, v in values.items()]
        if time.monotonic() - self.flushed_at > self.FLUSH_SECONDS:
            self.flush()

    def pending(self) -> list[tuple]:
        """Metrics not yet written, as plain values for the checkpoint."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self.metrics]

    def flush(self) -> None:
        while self.params or self.metrics:  # MLflow's per-call limits: 100 params, 1000 values
            params, self.params = self.params[:100], self.params[100:]
            metrics, self.metrics = self.metrics[:1000], self.metrics[1000:]
            self.client.log_batch(self.run_id, metrics=metrics, params=params)
        self.flushed_at = time.monotonic()

    def finish(self, summary: dict[str, float], artifacts: Path) -> None:
        """Final metrics and the files in `artifacts` (config and manifest added), FINISHED."""
        now = int(time.time() * 1000)
        self.metrics += [Metric(f"final/{k}", float(v), now, 0) for k, v in summary.items()]
        self.flush()
        self._write_config(artifacts)
        self.client.log_artifacts(self.run_id, str(artifacts))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        try:
            self.flush()
            with tempfile.TemporaryDirectory() as folder:
                self._write_config(Path(folder))
                self.client.log_artifacts(self.run_id, folder)
        finally:
            self.client.log_batch(self.run_id, tags=[RunTag(f"{TAG}error", reason[:5000])])
            self.client.set_terminated(self.run_id, "FAILED")

    def _write_config(self, folder: Path) -> None:
        (folder / "config.yaml").write_text(yaml.safe_dump(self.cell.config, sort_keys=False))
        (folder / "stream_manifest.json").write_text(json.dumps({"experiences": self.manifest}))


def log_groups(grid_run: GridRun, groups: dict[tuple[str, str, str], dict[str, float]]) -> None:
    """One run per (stream, strategy, grid point) carrying `final/<metric>_mean` and `_std`."""
    client = MlflowClient(grid_run.tracking_uri)
    now = int(time.time() * 1000)
    for (stream, strategy, variant), values in groups.items():
        values = dict(values)
        seeds = values.pop("seeds")
        name = f"{stream}/{strategy}" + (f" [{variant}]" if variant != "-" else "") + " (seeds)"
        run = client.create_run(
            grid_run.experiment_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": grid_run.parent_run_id,
                f"{TAG}role": "group",
                f"{TAG}stream": stream,
                f"{TAG}strategy": strategy,
                f"{TAG}variant": variant,
                f"{TAG}seeds": str(seeds),
            },
        )
        metrics = [Metric(f"final/{k}", float(v), now, 0) for k, v in values.items() if v == v]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id, "FINISHED")


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists as JSON text, as MLflow params."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v
            for k, v in config_flatten(config).items()}  # fmt: skip
