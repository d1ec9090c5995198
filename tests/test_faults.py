"""Nothing lost, nothing doubled: a cell ends FINISHED exactly once per store whatever
happens around it (another store, a deleted run, a truncated checkpoint, two drivers, a
tracking server that goes away, Ctrl-C, a killed driver)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from servers import free_port, wait_until_answers

from forgetless.experiments import checkpoint, tracking
from forgetless.experiments.compare import compare_table
from forgetless.experiments.runner import checkpoint_path, run_grid
from forgetless.strategies.base import Strategy

FIVE = [{"name": "split_digits", "n_experiences": 5}]
CLI = [sys.executable, "-m", "forgetless.experiments.cli"]


def interrupted(grid, uri: str, index: int) -> None:
    """Run `grid` into `uri` until Ctrl-C at the start of experience `index`."""
    original = Strategy.train

    def train(self, experience):
        if experience.index == index:
            raise KeyboardInterrupt
        original(self, experience)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Strategy, "train", train)
        with pytest.raises(KeyboardInterrupt):
            run_grid(grid, uri)


def runs_of(uri: str, grid_name: str, role: str = "cell") -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    return client.search_runs([experiment.experiment_id], f"tags.`forgetless.role` = '{role}'")


def one_finished_run_per_cell(uri: str, grid) -> None:
    finished = [r.data.tags["forgetless.cell_hash"] for r in runs_of(uri, grid.name)
                if r.info.status == "FINISHED"]  # fmt: skip
    assert sorted(finished) == sorted(c.hash for c in grid.cells)
    client = MlflowClient(uri)
    for run in runs_of(uri, grid.name):
        if run.info.status == "FINISHED":
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc/exp_0")]
            assert sorted(steps) == list(range(len(steps))), "a step logged twice"


def store(tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}"


# --- 1. checkpoints belong to their store and run ----------------------------------------


def test_the_same_grid_into_a_second_store_finishes_every_cell(write_grid, new_store, tmp_path):
    a, b = new_store(tmp_path, "a.db"), new_store(tmp_path, "b.db")
    grid = write_grid(seeds=[0, 1], strategies=["naive", "rehearsal"])
    assert {o.status for o in run_grid(grid, a)} == {"FINISHED"}
    outcomes = run_grid(grid, b)
    assert [o.status for o in outcomes] == ["FINISHED"] * 4
    one_finished_run_per_cell(b, grid)


def test_a_checkpoint_of_another_store_is_set_aside_and_the_cell_runs_anew(
    write_grid, new_store, tmp_path, logged_matrix
):
    a, b, c = (new_store(tmp_path, name) for name in ("a.db", "b.db", "c.db"))
    grid = write_grid(streams=FIVE)
    (cell,) = grid.cells
    interrupted(grid, a, 2)
    path = checkpoint_path(grid.storage, cell)
    assert checkpoint.load(path)["next"] == 2

    (outcome,) = run_grid(grid, b)
    assert outcome.status == "FINISHED"
    assert any("belongs to run" in n and path in n for n in outcome.notes), outcome.notes
    assert Path(path + ".stale").is_file()
    reference = write_grid(name=grid.name + "-ref", streams=FIVE)
    run_grid(reference, c)
    assert np.array_equal(
        logged_matrix(b, grid.name, cell.hash), logged_matrix(c, reference.name, cell.hash)
    )


def test_a_checkpoint_of_a_deleted_run_is_set_aside(write_grid, new_store, tmp_path):
    uri = new_store(tmp_path, "a.db")
    grid = write_grid(streams=FIVE)
    interrupted(grid, uri, 2)
    (killed,) = runs_of(uri, grid.name)
    assert killed.info.status == "KILLED"  # at once, not at the next submission
    MlflowClient(uri).delete_run(killed.info.run_id)  # as from the UI

    (outcome,) = run_grid(grid, uri)
    assert outcome.status == "FINISHED"
    assert any("belongs to run " + killed.info.run_id in n for n in outcome.notes)
    one_finished_run_per_cell(uri, grid)


# --- 4. an unreadable checkpoint ------------------------------------------------------------


def test_a_truncated_checkpoint_is_named_set_aside_and_the_cell_restarts(
    write_grid, new_store, tmp_path
):
    uri = new_store(tmp_path, "a.db")
    grid = write_grid(streams=FIVE)
    interrupted(grid, uri, 3)
    path = checkpoint_path(grid.storage, grid.cells[0])
    with open(path, "r+b") as file:
        file.truncate(200)
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=path):
        checkpoint.load(path)

    (outcome,) = run_grid(grid, uri)
    assert outcome.status == "FINISHED"
    assert any(path in n and "unreadable" in n and "from scratch" in n for n in outcome.notes)
    assert Path(path + ".unreadable").is_file()
    one_finished_run_per_cell(uri, grid)
    (run,) = [r for r in runs_of(uri, grid.name) if r.info.status == "FINISHED"]
    assert "unreadable" in run.data.tags["forgetless.warning"]


# --- 2. two drivers on one grid and one store -----------------------------------------------


@pytest.mark.integration  # drives the CLI in subprocesses
def test_two_drivers_started_together_leave_one_finished_run_per_cell(make_grid, tmp_path):
    """Two `forgetless run` processes on a fresh SQLite store: it is created once, every cell
    runs once, and the driver that finds cells held by the other says so."""
    grid = make_grid(seeds=[0, 1], strategies=["naive", "rehearsal"])
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid.source))
    uri = store(tmp_path, "fresh.db")
    command = [*CLI, "run", str(path), "--no-ray", "--tracking-uri", uri]
    drivers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [d.communicate(timeout=300) for d in drivers]
    for driver, (_, err) in zip(drivers, results):
        assert driver.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    one_finished_run_per_cell(uri, grid)
    assert len(runs_of(uri, grid.name)) == 4  # no run was opened twice
    said = "".join(out + err for out, err in results)
    assert "HELD" in said or "already finished" in said
    assert list(compare_table(uri, grid.name)["seeds"]) == [2, 2]


def mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on folder/mlflow.db at `port`, answering /health when returned."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=folder, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if wait_until_answers(f"http://127.0.0.1:{port}/health", process):
        return process
    stop(process)
    pytest.fail("mlflow server did not start")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def server(tmp_path):
    """(url, restart) of an MLflow server that a test may stop and start again."""
    port = free_port()
    processes = [mlflow_server(tmp_path, port)]

    def restart() -> None:
        processes.append(mlflow_server(tmp_path, port))

    yield f"http://127.0.0.1:{port}", processes, restart
    for process in processes:
        if process.poll() is None:
            stop(process)


@pytest.mark.integration
def test_two_drivers_on_a_server_settle_their_claims(server, make_grid):
    """No file lock over HTTP: each driver writes its claims, waits, and keeps the cells
    whose earliest live claim is its own."""
    url, _, _ = server
    grid = make_grid(seeds=[0, 1, 2], strategies=["naive"])
    outcomes: list[list] = [[], []]
    drivers = [threading.Thread(target=lambda k=k: outcomes[k].extend(run_grid(grid, url)))
               for k in range(2)]  # fmt: skip
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join(timeout=300)
    statuses = [o.status for both in outcomes for o in both]
    assert statuses.count("FINISHED") == 3
    assert set(statuses) <= {"FINISHED", "HELD", "SKIPPED"}
    one_finished_run_per_cell(url, grid)


# --- 3. the tracking server goes away mid-grid ----------------------------------------------


@pytest.mark.integration
def test_a_server_outage_keeps_what_trained_and_logs_it_on_resubmission(
    server, make_grid, monkeypatch
):
    url, processes, restart = server
    monkeypatch.setattr(tracking, "PATIENCE_S", 3.0)
    grid = make_grid(streams=FIVE, strategies=["rehearsal"])
    original = Strategy.train
    trained: list[int] = []

    def train(self, experience):
        if experience.index == 3 and processes[-1].poll() is None:
            stop(processes[-1])  # the server dies while the cell trains
        trained.append(experience.index)
        original(self, experience)

    monkeypatch.setattr(Strategy, "train", train)
    seen: list = []
    with pytest.raises(tracking.TrackingUnavailable):
        run_grid(grid, url, on_outcome=seen.append)
    ((outcome),) = seen
    assert outcome.status == "UNLOGGED"
    assert trained == [0, 1, 2, 3, 4]
    path = checkpoint_path(grid.storage, grid.cells[0])
    assert checkpoint.load(path)["next"] == 5  # training results kept

    restart()
    trained.clear()
    (outcome,) = run_grid(grid, url)
    assert outcome.status == "FINISHED"
    assert trained == []  # logged from the checkpoint, not trained again
    one_finished_run_per_cell(url, grid)
    (run,) = [r for r in runs_of(url, grid.name) if r.info.status == "FINISHED"]
    history = MlflowClient(url).get_metric_history(run.info.run_id, "avg_acc")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]


# --- 10. Ctrl-C and a killed driver -------------------------------------------------------


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_driver(make_grid, tmp_path: Path, uri: str):
    grid = make_grid(streams=FIVE, seeds=[0, 1], train={"epochs": 5, "batch_size": 32,
                                                        "lr": 0.05})  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid.source))
    # As from a terminal: a job started in the background (`nohup ... &`) inherits SIGINT
    # ignored, and Python then keeps it ignored, so Ctrl-C would never reach the driver.
    driver = subprocess.Popen([*CLI, "run", str(path), "--no-ray", "--tracking-uri", uri],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=default_sigint)  # fmt: skip
    target = checkpoint_path(grid.storage, grid.cells[0])
    deadline = time.monotonic() + 120
    while not Path(target).exists():
        assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()
        time.sleep(0.1)
    return grid, driver


@pytest.mark.integration  # drives the CLI in subprocesses
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_says_one_line_exits_130_and_marks_cells_killed(
    make_grid, tmp_path, stop
):
    uri = store(tmp_path, "a.db")
    grid, driver = start_driver(make_grid, tmp_path, uri)
    driver.send_signal(stop)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    assert "interrupted" in err
    statuses = {r.info.status for r in runs_of(uri, grid.name)}
    assert statuses == {"KILLED"}  # the running cell and the one still scheduled
    (parent,) = runs_of(uri, grid.name, "grid")
    assert parent.info.status == "KILLED"


@pytest.mark.integration  # drives the CLI in subprocesses
def test_a_killed_drivers_runs_are_closed_and_its_cells_resumed(make_grid, tmp_path):
    uri = store(tmp_path, "a.db")
    grid, driver = start_driver(make_grid, tmp_path, uri)
    driver.kill()
    driver.communicate()
    (parent,) = runs_of(uri, grid.name, "grid")
    assert parent.info.status == "RUNNING"  # nobody could close it

    outcomes = run_grid(grid, uri)  # at once: the driver's process is gone
    assert [o.status for o in outcomes] == ["FINISHED", "FINISHED"]
    old = MlflowClient(uri).get_run(parent.info.run_id)
    assert old.info.status == "KILLED"
    one_finished_run_per_cell(uri, grid)
    assert len(runs_of(uri, grid.name)) == 2  # the killed driver's runs were resumed


# --- 12. commands that only read ----------------------------------------------------------


@pytest.mark.integration  # drives the CLI in subprocesses
def test_read_only_commands_refuse_a_store_that_does_not_exist(tmp_path):
    missing = tmp_path / "typo.db"
    for command in ("compare", "report"):
        result = subprocess.run([*CLI, command, "g", "--tracking-uri", f"sqlite:///{missing}"],
                                capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2
        assert "no store at" in result.stderr
    assert not missing.exists()


@pytest.mark.integration  # drives the CLI in subprocesses
def test_read_only_commands_against_a_dead_server_fail_fast(tmp_path):
    tick = time.monotonic()
    result = subprocess.run([*CLI, "compare", "g", "--tracking-uri",
                             f"http://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "no MLflow server answers" in result.stderr
    assert time.monotonic() - tick < 60


@pytest.mark.integration
def test_ui_stopped_with_sigterm_stops_its_server(finished_grid, tmp_path):
    uri, _ = finished_grid
    port = free_port()
    ui = subprocess.Popen([*CLI, "ui", "--tracking-uri", uri, "--port", str(port)],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)  # fmt: skip
    assert wait_until_answers(f"http://127.0.0.1:{port}/health", ui)
    ui.send_signal(signal.SIGTERM)
    ui.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
    os.killpg(ui.pid, signal.SIGKILL)
    pytest.fail("the MLflow server outlived `forgetless ui`")


# --- 6. a cell that learnt nothing is flagged ---------------------------------------------


def test_a_diverged_cell_is_flagged_in_mlflow_and_to_the_driver(write_grid, tracking_uri):
    grid = write_grid(streams=FIVE, train={"epochs": 1, "batch_size": 32, "lr": 1e8,
                                            "momentum": 0.9})  # fmt: skip
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED"
    assert any(n.startswith("flagged: ") for n in outcome.notes)
    (run,) = runs_of(tracking_uri, grid.name)
    assert "chance" in run.data.tags["forgetless.flag"] or "non-finite" in run.data.tags[
        "forgetless.flag"]  # fmt: skip
