"""Shared fixtures: one MLflow store per test session, tiny grids written to tmp folders,
one small finished grid for the tests that read results, and servers started on free ports."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from servers import free_port, wait_until_answers

from forgetless.experiments.config import Grid, load_grid

_names = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole session: the models here are tiny, and on two cores
    shared with other work a second thread mostly spins, costing CPU time and wall time."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch):
    """No hub at run time: models and data come from packages and files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def shared_cache(monkeypatch, tmp_path_factory):
    """One FORGETLESS_CACHE for the session, so a base model is pre-trained once."""
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A SQLite file MLflow has created and migrated, once per session: creating a store runs
    every schema migration, and a copy of this file is the same empty store at a fraction
    of the cost."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def new_store(empty_store, tmp_path_factory):
    """new_store(folder=None, name="mlflow.db") -> the URI of a fresh SQLite store there
    (default: a new temporary folder), a copy of the empty store. A test of how a store is
    created opens its own URI instead."""

    def make(folder: Path | None = None, name: str = "mlflow.db") -> str:
        folder = folder or tmp_path_factory.mktemp("store")
        shutil.copyfile(empty_store, folder / name)
        return f"sqlite:///{folder / name}"

    return make


@pytest.fixture(scope="session")
def tracking_uri(new_store) -> str:
    """A SQLite store shared by the session; each test uses its own grid name (experiment)."""
    return new_store()


@pytest.fixture
def write_grid(tmp_path: Path):
    """write_grid(**fields) -> Grid: a tiny split_digits grid, overridable field by field."""

    def write(**fields) -> Grid:
        return _grid(tmp_path, **fields)

    return write


def _grid(folder: Path, **fields) -> Grid:
    data = {
        "name": f"test-{next(_names)}",
        "seeds": [0],
        "streams": [
            {
                "name": "split_digits",
                "n_experiences": 2,
                "fixed_class_order": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            }
        ],  # fmt: skip
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "strategies": ["naive"],
        "storage": str(folder / "runs"),
    }
    data.update(fields)
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_grid(path)


@pytest.fixture(scope="session")
def make_grid(tmp_path_factory):
    """make_grid(**fields) -> Grid: write_grid for fixtures wider than one test."""
    return lambda **fields: _grid(tmp_path_factory.mktemp("grid"), **fields)


@pytest.fixture(scope="session")
def finished_grid(make_grid, new_store) -> tuple[str, str]:
    """(tracking URI, grid name) of naive and rehearsal x 2 seeds x 2 experiences, run once
    into a store of its own: the grid the report, compare and browser tests read."""
    from forgetless.experiments.runner import run_grid

    uri = new_store()
    grid = make_grid(
        name="finished",
        seeds=[0, 1],
        strategies=["naive", {"name": "rehearsal", "buffer": {"size": 50}}],
        train={"epochs": 3, "batch_size": 32, "lr": 0.05},  # enough to learn: none flagged
    )
    assert {o.status for o in run_grid(grid, uri)} == {"FINISHED"}
    return uri, grid.name


@pytest.fixture(scope="session")
def serve():
    """serve(command, folder) -> (base URL, stdout file): start a server on a free port (the
    command's "{port}"), wait until its /health answers, stop its process group at the end."""
    processes = []

    def start(command: list[str], folder: Path) -> tuple[str, Path]:
        port = free_port()
        command = [part.replace("{port}", str(port)) for part in command]
        out, err = folder / "server.out", folder / "server.err"
        # No GenAI job runner: an MLflow server starts in seconds, not half a minute, on two
        # shared cores, and stops at once.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen(command, cwd=folder, stdout=stdout, stderr=stderr,
                                       env=env, start_new_session=True)  # fmt: skip
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        if wait_until_answers(f"{url}/health", process):
            return url, out
        pytest.fail(f"{command[:4]} did not answer at {url} (exit code {process.poll()}):\n"
                    f"{err.read_text()[-3000:]}")  # fmt: skip

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def logged_matrix(tmp_path):
    """logged_matrix(uri, grid_name, cell_hash) -> R of the cell's FINISHED run, as logged
    (a finished cell's checkpoint is removed; its matrix lives in MLflow)."""
    import json

    import numpy as np
    from mlflow import MlflowClient

    from forgetless.experiments.tracking import finished_cells

    def read(uri: str, grid_name: str, cell_hash: str):
        run_id = finished_cells(uri, grid_name)[cell_hash]
        folder = tmp_path / f"matrix-{run_id}"
        folder.mkdir(exist_ok=True)
        path = MlflowClient(uri).download_artifacts(run_id, "accuracy_matrix.json", str(folder))
        return np.array(json.loads(Path(path).read_text())["R"])

    return read
