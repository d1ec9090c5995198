"""MLflow tracking, exactly as DESIGN.md's naming contract says.

One experiment per grid, one parent run per submission (`forgetless.role=grid`), one
child run per cell (`forgetless.role=cell`), and one group run per (stream, strategy,
grid point) with mean and std over seeds (`forgetless.role=group`). Values are logged
with `MlflowClient.log_batch`: one call per experience, not one per value. The tracker
never knows which strategy ran; it receives plain numbers.

MLflow is imported where a store is first called, not with this module: importing it costs
seconds of CPU, and `forgetless compare` reads a SQLite store without it (`read_cells`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import filelock
import yaml

from forgetless.core.schema import ConfigError, suggest
from forgetless.experiments.config import Cell
from forgetless.experiments.config import flatten as config_flatten

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Metric

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "forgetless."
MAX_PARAM_LENGTH = 6000
# How long a tracking call is retried while the store does not answer before the cell's
# results are kept for the next submission instead (FORGETLESS_TRACKING_PATIENCE_S).
PATIENCE_S = float(os.environ.get("FORGETLESS_TRACKING_PATIENCE_S", "300"))
# A driver renews its lease every HEARTBEAT_S; another driver takes over the cells of one
# silent for LEASE_S. Over a server, claims settle for CLAIM_GRACE_S before they count:
# longer than a store write takes to be seen, much shorter than a driver's start.
HEARTBEAT_S, LEASE_S, CLAIM_GRACE_S = 20.0, 120.0, 2.0
# forgetless retries (with messages and a bound) on top of few quick MLflow retries; the
# MLflow default of 7 retries with doubling backoff stalls each call for minutes silently.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

log = logging.getLogger(__name__)
_ACTIVE_GRIDS: set[str] = set()  # parent runs of the drivers running in this process


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer for PATIENCE_S; nothing trained is thrown away."""


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]).expanduser() if uri.startswith("sqlite:///") else None


def check_tracking_uri(uri: str, must_exist: bool = False) -> None:
    """Fail fast if the store cannot be reached or created; with `must_exist` (the commands
    that only read), also if it does not exist yet, rather than creating an empty one."""
    parsed = urlparse(uri)
    path = sqlite_path(uri)
    if path is not None:
        folder = path.parent if str(path.parent) else Path(".")
        if must_exist and not path.is_file():
            raise ConfigError(
                f"--tracking-uri {uri!r}: no store at {str(path)!r}; run a grid first or "
                "point at the store it logged to (sqlite:///PATH or http://HOST:PORT)"
            )
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


def _transient(error: BaseException) -> bool:
    """Whether `error` says the store is unreachable or busy, not that a request is wrong."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError, requests.ConnectionError,
                             requests.Timeout)):  # fmt: skip
            return True
        text = str(seen)
        if any(s in text for s in ("Max retries exceeded", "Connection refused",
                                   "database is locked", "503", "Read timed out")):  # fmt: skip
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(fn: Callable[..., Any], *args: Any, patience: float | None = None, **kwargs: Any):
    """Call `fn`, retrying with doubling waits while the store is unreachable.

    Raises TrackingUnavailable after `patience` seconds (PATIENCE_S by default) and says
    in the log, once per outage, that it is waiting."""
    patience = PATIENCE_S if patience is None else patience
    deadline, wait, warned = time.monotonic() + patience, 1.0, False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not _transient(e):
                raise
            if time.monotonic() + wait > deadline:
                raise TrackingUnavailable(
                    f"the tracking store did not answer for {patience:.0f} s "
                    f"({type(e).__name__}: {str(e)[:200]})"
                ) from e
            if not warned:
                log.warning("tracking store unreachable (%s); retrying for up to %.0f s",
                            str(e)[:200], patience)  # fmt: skip
                warned = True
            time.sleep(wait)
            wait = min(2 * wait, 30.0)


class Store:
    """MlflowClient whose every call goes through `retrying`."""

    def __init__(self, uri: str, patience: float | None = None) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.patience = patience
        self._client = MlflowClient(uri)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        return functools.partial(retrying, method, patience=self.patience)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[bool]:
    """Serialise drivers on one SQLite store (creating it, claiming cells): yields True.
    A server store has no shared lock: yields False, and claims settle instead."""
    path = sqlite_path(uri)
    if path is None:
        yield False
        return
    with filelock.FileLock(f"{path}.lock", timeout=PATIENCE_S):
        yield True


def artifact_location(uri: str, grid_name: str) -> str | None:
    """Artifacts beside a local SQLite store; a server uses its own artifact root."""
    path = sqlite_path(uri)
    if path is not None:
        return (path.resolve().parent / "mlartifacts" / grid_name).as_uri()
    return None


@dataclass
class GridRun:
    """What a worker needs to log a cell: handed from the driver, so nesting holds."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    commit: str = ""  # of the forgetless source that runs the grid, when a git checkout


def source_commit() -> str:
    """The git commit of the forgetless checkout that runs, or "" (an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _describe_experiment(store: Store, experiment_id: str, grid_name: str) -> None:
    """Open the experiment in MLflow's model-training view, with a line on its layout."""
    store.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    store.set_experiment_tag(experiment_id, "mlflow.note.content", (
        f"forgetless grid `{grid_name}`: a parent run per submission (role grid), under it a "
        "group run per configuration with mean and std over seeds (role group), and under "
        "each group its seeds' finished cell runs (role cell). Terminal: "
        f"`forgetless compare {grid_name}`, `forgetless report {grid_name}`."))  # fmt: skip


# The charts view `forgetless ui` links to, saved as the MLflow UI saves a shared view: the
# experiment tag `mlflow.sharedViewState.<key>`, opened by `?viewStateShareKey=<key>` (the
# URL alone cannot carry grouping). The cells, grouped by strategy (each chart draws the
# mean over seeds with a band), every group shown: by default the UI hides all runs but the
# first ten, which in a grid are the neighbours of whichever ten come first. Sorted by
# name, not by date: only a date sort makes the UI add the cells' parents, the group runs,
# whose strategy tag would put them in the groups. Sections in this order, `final/avg_acc`
# and the `avg_acc` curve first in theirs; the UI adds every other chart behind them.
CHARTS_VIEW_KEY = "forgetless-by-strategy"
CHARTS_VIEW = {
    "searchFilter": f"tags.`{TAG}role` = 'cell'",
    "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
    "groupBy": {"aggregateFunction": "average",
                "groupByKeys": [{"mode": "tag", "groupByData": f"{TAG}strategy"}]},
    "runsHiddenMode": "SHOW_ALL",
    "useGroupedValuesInCharts": True,
    "isAccordionReordered": True,
    "compareRunSections": [{"uuid": name, "name": name, "display": True, "isReordered": True}
                           for name in ("final", "Model metrics", "acc")],
    "compareRunCharts": [{"uuid": key, "type": kind, "metricKey": key, "displayName": "avg_acc",
                          "metricSectionId": section, "isGenerated": True, "deleted": False,
                          "runsCountToCompare": 100}
                         for key, kind, section in (("final/avg_acc", "BAR", "final"),
                                                    ("avg_acc", "LINE", "Model metrics"))],
}  # fmt: skip


def share_charts_view(uri: str, experiment_id: str) -> str:
    """Save the charts view on the experiment (again, should a user have changed it); the
    query string of the URL that opens it, on the runs page, in chart mode."""
    Store(uri).set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{CHARTS_VIEW_KEY}",
                                  json.dumps(CHARTS_VIEW))  # fmt: skip
    return f"viewStateShareKey={CHARTS_VIEW_KEY}&compareRunsMode=CHART"


def open_grid(uri: str, grid_name: str, n_cells: int, grid_source: dict[str, Any]) -> GridRun:
    """Create the store, the experiment and the parent run before any worker logs, and
    close the parent runs of drivers that stopped without closing theirs."""
    from mlflow.exceptions import MlflowException

    commit = source_commit()
    with store_lock(uri):
        store = Store(uri)
        experiment = store.get_experiment_by_name(grid_name)
        if experiment is None:
            try:
                experiment_id = store.create_experiment(
                    grid_name, artifact_location=artifact_location(uri, grid_name)
                )
            except MlflowException as e:  # another driver created it since we looked
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = store.get_experiment_by_name(grid_name).experiment_id
        else:
            experiment_id = experiment.experiment_id
            for parent in _search_all(store, [experiment_id], f"tags.`{TAG}role` = 'grid' and "
                                      "attributes.status = 'RUNNING'"):  # fmt: skip
                if not _alive(parent):
                    store.set_tag(parent.info.run_id, f"{TAG}interrupted", "true")
                    store.set_terminated(parent.info.run_id, "KILLED")
        _describe_experiment(store, experiment_id, grid_name)
        run = store.create_run(
            experiment_id,
            run_name=f"{grid_name} ({time.strftime('%Y-%m-%d %H:%M:%S')})",
            tags={f"{TAG}role": "grid", f"{TAG}grid": grid_name, f"{TAG}cells": str(n_cells),
                  f"{TAG}heartbeat": str(time.time()), f"{TAG}host": socket.gethostname(),
                  f"{TAG}pid": str(os.getpid()), **_commit_tag(commit)},
        )  # fmt: skip
        _ACTIVE_GRIDS.add(run.info.run_id)  # until its Heartbeat ends
    store.log_text(run.info.run_id, yaml.safe_dump(grid_source, sort_keys=False), "grid.yaml")
    return GridRun(uri, experiment_id, run.info.run_id, commit)


# The packages a result depends on; a FINISHED cell carries `forgetless.version.<package>`.
VERSIONED = ["torch", "avalanche-lib", "transformers", "peft", "mlflow", "ray", "numpy"]


def version_tags() -> dict[str, str]:
    """This process's package versions, so that a report can state what produced a cell's
    numbers (on a cluster, the worker's, which may differ from the driver's)."""
    tags = {}
    for package in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"{TAG}version.{package}"] = metadata.version(package)
    return tags


def _commit_tag(commit: str) -> dict[str, str]:
    return {"mlflow.source.git.commit": commit} if commit else {}


def close_grid(grid_run: GridRun, status: str, failed: int = 0) -> None:
    store = Store(grid_run.tracking_uri)
    store.set_tag(grid_run.parent_run_id, f"{TAG}failed_cells", str(failed))
    store.set_terminated(grid_run.parent_run_id, status)


def _alive(parent) -> bool:
    """A driver is alive while its parent run is RUNNING and its heartbeat is recent; on
    this machine, also only while its process runs (no need to wait out its lease)."""
    tags = parent.data.tags
    if parent.info.status != "RUNNING":
        return False
    if tags.get(f"{TAG}host") == socket.gethostname():
        pid = int(tags.get(f"{TAG}pid", 0))
        if pid == os.getpid():
            return parent.info.run_id in _ACTIVE_GRIDS
        if not _process_exists(pid):
            return False
    return time.time() - float(tags.get(f"{TAG}heartbeat", 0)) < LEASE_S


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0


class Heartbeat:
    """The driver's lease on the cells it claimed: the parent run's `heartbeat` tag, renewed
    from a background thread while the grid runs."""

    def __init__(self, grid_run: GridRun) -> None:
        self.store = Store(grid_run.tracking_uri, patience=0)
        self.run_id = grid_run.parent_run_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="forgetless-heartbeat",
                                       daemon=True)  # fmt: skip

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        _ACTIVE_GRIDS.discard(self.run_id)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.store.set_tag(self.run_id, f"{TAG}heartbeat", str(time.time()))
            except Exception:  # noqa: BLE001 - an outage: the next beat tries again
                log.debug("heartbeat not written", exc_info=True)


@dataclass
class Claims:
    """What a driver may run: cell hash -> its run id; and what it must leave alone."""

    runs: dict[str, str]
    finished: set[str]
    held: dict[str, str]  # cell hash -> the run name of the driver that holds it


def claim_cells(grid_run: GridRun, cells: list[Cell]) -> Claims:
    """Take a lease on each cell that no live driver holds and that has not FINISHED.

    A cell is claimed by its run, SCHEDULED until a worker starts it: a new run, or the
    run that a stopped driver left unfinished (so a checkpoint resumes the same run). On
    a SQLite store a file lock makes the claim atomic; on a server each driver writes its
    claims, waits CLAIM_GRACE_S, and keeps only the cells whose earliest live claim is
    its own, so two drivers never both run a cell.
    """
    me, uri = grid_run.parent_run_id, grid_run.tracking_uri
    store = Store(uri)
    wanted = {c.hash: c for c in cells}
    claims = Claims({}, set(), {})
    with store_lock(uri) as atomic:
        parents, runs = _grid_state(store, grid_run.experiment_id, wanted)
        for cell_hash, cell in wanted.items():
            mine = runs.get(cell_hash, [])
            holder = _holder(mine, parents, me)
            if any(r.info.status == "FINISHED" for r in mine):
                claims.finished.add(cell_hash)
            elif holder is not None:
                claims.held[cell_hash] = holder
            else:
                claims.runs[cell_hash] = _take(store, grid_run, cell, mine)
    if atomic or not claims.runs:
        return claims
    time.sleep(CLAIM_GRACE_S)
    parents, runs = _grid_state(store, grid_run.experiment_id, wanted)
    for cell_hash in list(claims.runs):
        live = [r for r in runs.get(cell_hash, []) if _live_claim(r, parents)]
        first = min(live, key=lambda r: (float(r.data.tags.get(f"{TAG}claimed_at", 0)),
                                         r.info.run_id), default=None)  # fmt: skip
        if first is None or first.data.tags.get(f"{TAG}driver") != me:
            run_id = claims.runs.pop(cell_hash)
            if first is None or first.info.run_id != run_id:
                store.delete_run(run_id)
            claims.held[cell_hash] = _driver_name(first, parents)
    return claims


def _grid_state(store: Store, experiment_id: str, wanted: dict[str, Cell]):
    parents = {p.info.run_id: p for p in _search_all(store, [experiment_id],
                                                     f"tags.`{TAG}role` = 'grid'")}  # fmt: skip
    runs: dict[str, list] = {}
    for run in _search_all(store, [experiment_id], f"tags.`{TAG}role` = 'cell'"):
        cell_hash = run.data.tags.get(f"{TAG}cell_hash")
        if cell_hash in wanted:
            runs.setdefault(cell_hash, []).append(run)
    return parents, runs


def _live_claim(run, parents: dict) -> bool:
    driver = parents.get(run.data.tags.get(f"{TAG}driver", ""))
    return run.info.status in ("RUNNING", "SCHEDULED") and driver is not None and _alive(driver)


def _holder(runs: list, parents: dict, me: str) -> str | None:
    for run in runs:
        if _live_claim(run, parents) and run.data.tags.get(f"{TAG}driver") != me:
            return _driver_name(run, parents)
    return None


def _driver_name(run, parents: dict) -> str:
    driver = parents.get(run.data.tags.get(f"{TAG}driver", "")) if run is not None else None
    if driver is None:
        return "another driver"
    tags = driver.data.tags
    return (f"{driver.info.run_name} on {tags.get(f'{TAG}host', '?')} (pid "
            f"{tags.get(f'{TAG}pid', '?')}); if that driver is gone, its lease ends within "
            f"{LEASE_S:.0f} s")  # fmt: skip


def _take(store: Store, grid_run: GridRun, cell: Cell, runs: list) -> str:
    """The run this driver will log the cell to: the latest one a stopped driver left
    unfinished (RUNNING, SCHEDULED or KILLED), else a new one. FAILED runs keep their
    reason; the others of the cell are closed as KILLED."""
    from mlflow.entities import RunTag

    lease = {f"{TAG}driver": grid_run.parent_run_id, f"{TAG}claimed_at": str(time.time()),
             "mlflow.parentRunId": grid_run.parent_run_id}  # fmt: skip
    unfinished = sorted((r for r in runs if r.info.status in ("RUNNING", "SCHEDULED", "KILLED")),
                        key=lambda r: r.info.start_time)  # fmt: skip
    for stale in unfinished[:-1]:
        if stale.info.status != "KILLED":
            store.set_terminated(stale.info.run_id, "KILLED")
    if unfinished:
        run_id = unfinished[-1].info.run_id
        store.log_batch(run_id, tags=[RunTag(k, v) for k, v in lease.items()])
    else:
        run_id = store.create_run(grid_run.experiment_id, run_name=cell.label(),
                                  tags={**cell_tags(cell), **lease,
                                        **_commit_tag(grid_run.commit)}).info.run_id  # fmt: skip
    store.update_run(run_id, status="SCHEDULED")
    return run_id


def release(grid_run: GridRun, run_ids: Iterable[str]) -> None:
    """End as KILLED the claimed runs of cells that did not end (Ctrl-C, a dying driver)."""
    store = Store(grid_run.tracking_uri, patience=10)
    for run_id in run_ids:
        store.set_tag(run_id, f"{TAG}interrupted", "true")
        store.set_terminated(run_id, "KILLED")


def finished_cells(uri: str, grid_name: str) -> dict[str, str]:
    """cell hash -> run id of every FINISHED cell run of this grid (for resubmission)."""
    with store_lock(uri):  # the first call on a new SQLite store creates its tables
        store = Store(uri)
        experiment = store.get_experiment_by_name(grid_name)
    if experiment is None:
        return {}
    runs = _search_all(
        store,
        [experiment.experiment_id],
        f"tags.`{TAG}role` = 'cell' and attributes.status = 'FINISHED'",
    )
    return {r.data.tags[f"{TAG}cell_hash"]: r.info.run_id for r in runs}


def run_is_open(uri: str, run_id: str | None) -> bool:
    """Whether `run_id` is a run of this store that can still be logged to."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        run = Store(uri).get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active" and run.info.status != "FINISHED"


def grid_experiment(uri: str, grid_name: str) -> Experiment:
    """The grid's MLflow experiment; a name not in the store is an error listing the grids."""
    store = Store(uri)
    experiment = store.get_experiment_by_name(grid_name)
    if experiment is None:
        raise _no_grid(grid_name, [e.name for e in store.search_experiments()], uri)
    return experiment


def _no_grid(grid_name: str, experiments: Iterable[str], uri: str) -> ConfigError:
    """The error for a grid the store does not hold: the grids it holds, the closest first."""
    names = sorted(n for n in experiments if n != "Default")
    return ConfigError(
        f"no grid named {grid_name!r} in {uri}; grids there: {', '.join(names) or '(none)'}"
        f"{suggest(grid_name, names)} (or run the grid first)"
    )


def summary_runs(uri: str, grid_name: str) -> tuple[str, dict[tuple[str, str, str], str]] | None:
    """The run id of each of the grid's group runs by (stream, strategy, variant), and of
    the parent run they nest under: the submission that last rebuilt them, which need not
    be the latest (a driver that found every cell held by another has no groups). None
    when the grid has no group run."""
    experiment_id = grid_experiment(uri, grid_name).experiment_id
    runs = _search_all(Store(uri), [experiment_id], f"tags.`{TAG}role` = 'group'")
    if not runs:
        return None
    groups = {
        (r.data.tags[f"{TAG}stream"], r.data.tags[f"{TAG}strategy"], r.data.tags[f"{TAG}variant"]):
        r.info.run_id
        for r in runs
    }  # fmt: skip
    return runs[0].data.tags["mlflow.parentRunId"], groups


def cell_runs(uri: str, grid_name: str, status: str | None = "FINISHED") -> list:
    experiment = grid_experiment(uri, grid_name)
    query = f"tags.`{TAG}role` = 'cell'"
    if status:
        query += f" and attributes.status = '{status}'"
    return _search_all(Store(uri), [experiment.experiment_id], query)


@dataclass
class CellRecord:
    """A FINISHED cell run as `read_cells` gives it: plain values, no MLflow entity."""

    grid: str
    run_id: str
    tags: dict[str, str]
    final: dict[str, float]  # the final metrics, keys with their `final/` prefix
    params: dict[str, str]
    artifact_uri: str = ""  # where its files are (accuracy_matrix.json, stream_manifest.json)


def read_cells(uri: str, grid_names: list[str]) -> list[CellRecord]:
    """The FINISHED cell runs of these grids, newest first as `search_runs` orders them; a
    name not in the store is an error listing the grids there.

    A SQLite store is read in four queries on MLflow's own tables, opened read-only, without
    importing MLflow, whose import alone takes longer than the whole table should (#31). A
    server, or a schema these queries do not know, is read in one `search_runs` over all the
    grids' experiments: the same values, since both read the runs' latest metrics.
    """
    path = sqlite_path(uri)
    if path is not None:
        try:
            return _read_sqlite_cells(path, uri, grid_names)
        except sqlite3.DatabaseError as e:
            log.debug("%s: read through MLflow (%s)", uri, e)
    return _search_cells(uri, grid_names)


def _search_cells(uri: str, grid_names: list[str]) -> list[CellRecord]:
    store = Store(uri)
    experiments = {e.name: e.experiment_id for e in store.search_experiments()}
    ids = _experiment_ids(experiments, uri, grid_names)
    names = {v: k for k, v in experiments.items()}
    query = f"tags.`{TAG}role` = 'cell' and attributes.status = 'FINISHED'"
    return [
        CellRecord(
            names[run.info.experiment_id],
            run.info.run_id,
            dict(run.data.tags),
            {k: v for k, v in run.data.metrics.items() if k.startswith("final/")},
            dict(run.data.params),
            run.info.artifact_uri,
        )
        for run in _search_all(store, list(ids.values()), query)
    ]


def _experiment_ids(experiments: dict[str, str], uri: str, grid_names: list[str]) -> dict:
    """grid name -> experiment id, for each of `grid_names`; ConfigError naming the grids."""
    missing = [name for name in grid_names if name not in experiments]
    if missing:
        raise _no_grid(missing[0], experiments, uri)
    return {name: str(experiments[name]) for name in grid_names}


def _read_sqlite_cells(path: Path, uri: str, grid_names: list[str]) -> list[CellRecord]:
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                            timeout=PATIENCE_S)) as db:  # fmt: skip
        active = "SELECT name, experiment_id FROM experiments WHERE lifecycle_stage = 'active'"
        experiments = {name: str(experiment_id) for name, experiment_id in db.execute(active)}
        ids = _experiment_ids(experiments, uri, grid_names)
        names = {v: k for k, v in ids.items()}
        marks = ", ".join("?" * len(ids))
        cells = (
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            f"WHERE r.experiment_id IN ({marks}) AND r.status = 'FINISHED' AND "
            f"r.lifecycle_stage = 'active' AND t.key = '{TAG}role' AND t.value = 'cell'"
        )
        wanted = list(ids.values())
        runs = db.execute("SELECT run_uuid, experiment_id, artifact_uri FROM runs WHERE run_uuid "
                          f"IN ({cells}) ORDER BY start_time DESC, run_uuid", wanted)  # fmt: skip
        records = {run_id: CellRecord(names[str(experiment_id)], run_id, {}, {}, {}, artifacts)
                   for run_id, experiment_id, artifacts in runs.fetchall()}  # fmt: skip
        for run_id, key, value in db.execute(
            f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({cells})", wanted
        ):
            records[run_id].tags[key] = value
        for run_id, key, value in db.execute(
            f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({cells})", wanted
        ):
            records[run_id].params[key] = value
        for run_id, key, value, is_nan in db.execute(
            "SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE "
            f"substr(key, 1, 6) = 'final/' AND run_uuid IN ({cells})", wanted
        ):  # fmt: skip
            records[run_id].final[key] = float("nan") if is_nan else value  # as MLflow reads it
    return list(records.values())


def _search_all(client: MlflowClient | Store, experiment_ids: list[str], query: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def cell_tags(cell: Cell) -> dict[str, str]:
    tags = {
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
    return tags


class CellRun:
    """The MLflow run of one cell, logged in a few batched calls.

    Parameters and per-step metrics are buffered and written with one `log_batch` at
    most every FLUSH_SECONDS and at the end, with the artifacts in one upload. A short
    cell thus costs a handful of store calls, and a long one shows progress every few
    seconds. What is not yet written travels in the cell's checkpoint (`pending`), so a
    killed worker or a store that stops answering loses no metric: metrics carry their
    first timestamps, and MLflow stores an identical metric once.
    """

    FLUSH_SECONDS = 10.0

    def __init__(self, grid_run: GridRun, run_id: str, cell: Cell, manifest: list[dict],
                 pending: list[tuple] = ()) -> None:  # fmt: skip
        from mlflow.entities import Metric, Param

        self.store = Store(grid_run.tracking_uri)
        self.run_id = run_id
        self.cell = cell
        self.manifest = manifest
        self.params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(cell.config).items()]
        self.metrics: list[Metric] = [Metric(*m) for m in pending]
        self.warnings: list[str] = []
        self.tags: dict[str, str] = {}
        self.flushed_at = time.monotonic()
        self.store.update_run(run_id, status="RUNNING")

    @classmethod
    def start(cls, grid_run: GridRun, cell: Cell, manifest: list[dict]) -> CellRun:
        """A new run for a cell that no driver claimed (a cell run on its own)."""
        tags = {
            **cell_tags(cell),
            "mlflow.parentRunId": grid_run.parent_run_id,
            **_commit_tag(grid_run.commit),
        }
        run = Store(grid_run.tracking_uri).create_run(
            grid_run.experiment_id, run_name=cell.label(), tags=tags
        )
        return cls(grid_run, run.info.run_id, cell, manifest)

    @classmethod
    def fresh(cls, grid_run: GridRun, run_id: str | None, cell: Cell, manifest: list[dict],
              reuse: bool = False) -> CellRun:  # fmt: skip
        """The cell's claimed run for a start from scratch. A run that already holds metrics
        of an attempt whose checkpoint is gone is closed KILLED and replaced by a new one
        with the same lease, so that no step is logged twice (`reuse` keeps it)."""
        if run_id is None:
            return cls.start(grid_run, cell, manifest)
        store = Store(grid_run.tracking_uri)
        old = store.get_run(run_id)
        if reuse or not old.data.metrics:
            return cls(grid_run, run_id, cell, manifest)
        store.set_tag(run_id, f"{TAG}interrupted", "true")
        store.set_terminated(run_id, "KILLED")
        lease = {k: v for k, v in old.data.tags.items()
                 if k in (f"{TAG}driver", f"{TAG}claimed_at", "mlflow.parentRunId")}  # fmt: skip
        run = store.create_run(grid_run.experiment_id, run_name=cell.label(),
                               tags={**cell_tags(cell), **lease,
                                     **_commit_tag(grid_run.commit)})  # fmt: skip
        return cls(grid_run, run.info.run_id, cell, manifest)

    def log_step(self, step: int, row: list[float], values: dict[str, float]) -> None:
        """Metrics after experience `step`: its accuracy row and named values."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics += [Metric(f"acc/exp_{j}", float(v), now, step) for j, v in enumerate(row)]
        self.metrics += [Metric(k, float(v), now, step) for k, v in values.items()]
        if time.monotonic() - self.flushed_at > self.FLUSH_SECONDS:
            try:  # progress only: what is not written goes on in the checkpoint
                self.flush(patience=0)
            except TrackingUnavailable as e:
                log.warning("%s: metrics kept for later: %s", self.cell.label(), e)
                self.flushed_at = time.monotonic()

    def warn(self, message: str) -> None:
        """A warning the user should see beside the cell's results (one line each)."""
        self.warnings.append(message)
        self.tag("warning", "\n".join(self.warnings)[-5000:])

    def tag(self, key: str, value: str) -> None:
        """Set tag `forgetless.<key>` now, or with the next write if the store is away."""
        self.tags[f"{TAG}{key}"] = value[:5000]
        with contextlib.suppress(TrackingUnavailable):
            self.flush(patience=0)

    def log_table(self, rows: dict[str, list], name: str) -> None:
        self.store.log_table(self.run_id, rows, name)

    def pending(self) -> list[tuple]:
        """Metrics not yet written, as plain values for the checkpoint."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self.metrics]

    def flush(self, patience: float | None = None) -> None:
        """Write what is buffered; a batch leaves the buffer only once the store has it."""
        from mlflow.entities import RunTag

        store = self.store if patience is None else Store(self.store.uri, patience)
        while self.params or self.metrics:  # MLflow's per-call limits: 100 params, 1000 values
            store.log_batch(self.run_id, metrics=self.metrics[:1000], params=self.params[:100])
            self.params, self.metrics = self.params[100:], self.metrics[1000:]
        if self.tags:
            store.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])
            self.tags = {}
        self.flushed_at = time.monotonic()

    def finish(self, summary: dict[str, float], artifacts: Path) -> None:
        """Final metrics and the files in `artifacts` (config and manifest added), FINISHED."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics += [Metric(f"final/{k}", float(v), now, 0) for k, v in summary.items()]
        self.tags.update(version_tags())
        self.flush()
        self._write_config(artifacts)
        self.store.log_artifacts(self.run_id, str(artifacts))
        self.store.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        from mlflow.entities import RunTag

        try:
            self.flush()
            with tempfile.TemporaryDirectory() as folder:
                self._write_config(Path(folder))
                self.store.log_artifacts(self.run_id, folder)
        finally:
            self.store.log_batch(self.run_id, tags=[RunTag(f"{TAG}error", reason[:5000])])
            self.store.set_terminated(self.run_id, "FAILED")

    def _write_config(self, folder: Path) -> None:
        (folder / "config.yaml").write_text(yaml.safe_dump(self.cell.config, sort_keys=False))
        (folder / "stream_manifest.json").write_text(json.dumps({"experiences": self.manifest}))


def log_groups(
    grid_run: GridRun,
    groups: dict[tuple[str, str, str], dict[str, float]],
    configs: dict[tuple[str, str, str], dict[str, str]] | None = None,
) -> None:
    """One run per (stream, strategy, grid point) carrying `final/<metric>_mean` and `_std`,
    and its configuration as params (the cells' params but the seed), to filter by."""
    from mlflow.entities import Metric, Param

    client = Store(grid_run.tracking_uri)
    now = int(time.time() * 1000)
    for key, values in groups.items():
        stream, strategy, variant = key
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
                **_commit_tag(grid_run.commit),
            },
        )
        metrics = [Metric(f"final/{k}", float(v), now, 0) for k, v in values.items() if v == v]
        client.log_batch(run.info.run_id, metrics=metrics)
        config = (configs or {}).get(key, {})
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in config.items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params a call
            client.log_batch(run.info.run_id, params=params[start : start + 100])
        client.set_terminated(run.info.run_id, "FINISHED")


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}; lists as JSON text, as MLflow params."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v
            for k, v in config_flatten(config).items()}  # fmt: skip
