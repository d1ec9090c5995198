"""Cells on Ray: parallel logging loses nothing, a killed worker resumes, bad input stops early."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import ray
from mlflow import MlflowClient

from forgetless.core.schema import ConfigError
from forgetless.experiments import checkpoint
from forgetless.experiments.cluster import check_resources, connect, device_for, ray_executor
from forgetless.experiments.config import Resources
from forgetless.experiments.runner import CellOutcome, checkpoint_path, local_executor, run_grid

pytestmark = pytest.mark.integration  # starts a Ray head

FIVE = [{"name": "split_digits", "n_experiences": 5}]


@pytest.fixture(scope="module")
def local_ray():
    # address="local": never join another `ray start` cluster on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cell_runs(uri: str, grid_name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    return client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")


def test_unreachable_cluster_address_is_a_clear_error():
    assert not ray.is_initialized()  # runs before the module's Ray session starts
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        connect("127.0.0.1:9")


def test_worker_device_is_the_gpu_ray_assigned_or_the_cpu():
    assert device_for(["3"], 0.25) == "cuda:0"  # CUDA_VISIBLE_DEVICES=3 makes it cuda:0
    assert device_for([], 0.25) == "cpu"
    assert device_for(["0"], 0.0) == "cpu"


def test_parallel_cells_on_ray_lose_no_metric_in_sqlite(local_ray, write_grid, tracking_uri):
    grid = write_grid(seeds=[0, 1, 2], strategies=["naive", {"name": "rehearsal"}], streams=FIVE)
    outcomes = run_grid(grid, tracking_uri, ray_executor(grid.resources, len(grid.cells)))
    assert [o.status for o in outcomes] == ["FINISHED"] * 6
    client = MlflowClient(tracking_uri)
    runs = cell_runs(tracking_uri, grid.name)
    assert len(runs) == 6
    for run in runs:
        for j in range(5):  # acc/exp_j logged after each of the 5 experiences
            history = client.get_metric_history(run.info.run_id, f"acc/exp_{j}")
            assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
        for key in ("avg_acc", "memory_bytes", "train_time_s", "eval_time_s"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 5
        assert sum(k.startswith("final/") for k in run.data.metrics) == 7


def test_killed_worker_resumes_its_cell_and_matches_an_undisturbed_run(
    local_ray, write_grid, tracking_uri, tmp_path, logged_matrix
):
    grid = write_grid(seeds=[0, 1], streams=FIVE, train={"epochs": 25, "lr": 0.05},
                      strategies=[{"name": "rehearsal", "buffer": {"size": 60}}])  # fmt: skip
    outcomes: list = []
    driver = threading.Thread(
        target=lambda: outcomes.extend(
            run_grid(grid, tracking_uri, ray_executor(grid.resources, len(grid.cells)))
        )
    )
    driver.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        states = [checkpoint.load(checkpoint_path(grid.storage, c)) for c in grid.cells]
        if any(s is not None and 1 <= s["next"] < 4 for s in states):
            workers = [
                p
                for p in psutil.Process().children(recursive=True)  # this test's workers only
                if " ".join(p.cmdline()).startswith("ray::_run_cell_task")
            ]
            victim = workers[0] if workers else None  # fmt: skip
        time.sleep(0.05)
    assert victim is not None, "no cell reached the middle of its stream"
    os.kill(victim.pid, signal.SIGKILL)
    driver.join(timeout=300)
    assert [o.status for o in outcomes] == ["FINISHED", "FINISHED"]

    runs = cell_runs(tracking_uri, grid.name)
    finished = [r.data.tags["forgetless.cell_hash"] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(c.hash for c in grid.cells)  # each exactly once

    # The same cells undisturbed, in this process, into another storage folder.
    reference = write_grid(name=grid.name + "-reference", seeds=[0, 1], streams=FIVE,
                           train={"epochs": 25, "lr": 0.05},
                           strategies=[{"name": "rehearsal", "buffer": {"size": 60}}],
                           storage=str(tmp_path / "reference"))  # fmt: skip
    run_grid(reference, tracking_uri, local_executor)
    for cell, twin in zip(grid.cells, reference.cells):
        assert cell.hash == twin.hash
        killed = logged_matrix(tracking_uri, grid.name, cell.hash)
        undisturbed = logged_matrix(tracking_uri, reference.name, twin.hash)
        assert np.array_equal(killed, undisturbed)


def test_resources_no_node_offers_are_refused(local_ray):
    with pytest.raises(ConfigError, match="no node"):
        check_resources(Resources(cpu=1, gpu=1))
    with pytest.raises(ConfigError, match="cpu 64"):
        check_resources(Resources(cpu=64, gpu=0))
    check_resources(Resources(cpu=1, gpu=0))


def test_a_driver_that_stops_reading_cancels_the_cells_it_submitted(local_ray, write_grid):
    """Ctrl-C in the driver (or any exception in its loop) closes the executor: the cells
    still queued or running are cancelled at once, not left running without a driver."""
    grid = write_grid(seeds=[0, 1, 2])

    def first_fast_then_slow(cell, device=None, threads=None):  # pickled by value for Ray
        if cell.seed != 0:
            time.sleep(60)
        return CellOutcome(cell.hash, cell.label(), "FINISHED")

    outcomes = ray_executor(grid.resources, 3)(grid.cells, first_fast_then_slow)
    first = next(outcomes)
    assert first.status == "FINISHED", first.error
    outcomes.close()  # what KeyboardInterrupt in run_grid's loop does to the generator

    def running() -> list:  # this test's workers busy with a cell
        return [p for p in psutil.Process().children(recursive=True)
                if " ".join(p.cmdline()).startswith("ray::_run_cell_task")]  # fmt: skip

    deadline = time.monotonic() + 30  # well before the slow cells' minute
    while running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running() == []
