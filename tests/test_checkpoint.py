"""Checkpoints: weights_only round trips, and a resumed cell equals an uninterrupted one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from forgetless.experiments import checkpoint, tracking
from forgetless.experiments.runner import build_cell, run_cell, run_grid
from forgetless.strategies.rehearsal import Rehearsal

REHEARSAL = {"name": "rehearsal", "buffer": {"size": 40, "policy": "class_balanced"}}
FIVE = [{"name": "split_digits", "n_experiences": 5}]


def test_strategy_state_round_trips_through_a_weights_only_checkpoint(write_grid, tmp_path):
    cell = write_grid(strategies=[REHEARSAL], train={"epochs": 1, "momentum": 0.9}).cells[0]
    stream, trained = build_cell(cell, "cpu")
    for experience in stream:
        trained.train(experience)
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, {"strategy": trained.state_dict(), "rng": checkpoint.rng_state()})

    _, fresh = build_cell(cell, "cpu")
    state = checkpoint.load(path)  # weights_only=True: would raise on arbitrary pickles
    fresh.load_state_dict(state["strategy"])
    for a, b in zip(trained.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(trained.buffer.samples.x, fresh.buffer.samples.x)
    assert fresh.buffer.seen == trained.buffer.seen
    momentum = fresh.optimizer.state_dict()["state"]
    assert momentum and all("momentum_buffer" in s for s in momentum.values())

    checkpoint.set_rng_state(state["rng"])
    first = torch.rand(3)
    checkpoint.set_rng_state(state["rng"])
    assert torch.equal(first, torch.rand(3))


def test_two_writers_of_one_checkpoint_never_rename_each_others_file(tmp_path, monkeypatch):
    """A second writer (another driver probing the same storage) saves the same path whole
    between the first writer's write and its rename: both renames find their own file."""
    path = str(tmp_path / "checkpoint.pt")
    replace, interleaved = os.replace, []

    def replace_after_another_writer(source, target):
        if not interleaved:
            interleaved.append(True)
            checkpoint.save(path, {"writer": 2})
        replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_another_writer)
    checkpoint.save(path, {"writer": 1})
    assert interleaved and checkpoint.load(path) == {"writer": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp left


def test_resumed_cell_equals_uninterrupted_run(
    write_grid, tracking_uri, tmp_path, monkeypatch, logged_matrix
):
    grid = write_grid(streams=FIVE, strategies=[REHEARSAL])
    cell = grid.cells[0]
    reference = write_grid(name=grid.name + "-reference", streams=FIVE, strategies=[REHEARSAL])
    reference_run = tracking.open_grid(tracking_uri, reference.name, 1, reference.source)
    undisturbed = run_cell(cell, reference_run, str(tmp_path / "a"))
    assert undisturbed.status == "FINISHED"
    grid_run = tracking.open_grid(tracking_uri, grid.name, 1, grid.source)

    original = Rehearsal.train

    def killed_at_third(self, experience):
        if experience.index == 2:
            raise KeyboardInterrupt  # as if the worker died mid-cell
        original(self, experience)

    monkeypatch.setattr(Rehearsal, "train", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, grid_run, str(tmp_path / "b"))
    monkeypatch.setattr(Rehearsal, "train", original)
    path_b = str(tmp_path / "b" / grid.name / cell.hash / "checkpoint.pt")
    assert checkpoint.load(path_b)["next"] == 2
    interrupted_run = checkpoint.load(path_b)["run_id"]
    resumed = run_cell(cell, grid_run, str(tmp_path / "b"))
    assert resumed.status == "FINISHED"
    assert checkpoint.load(path_b) is None  # a FINISHED cell needs no checkpoint

    full = logged_matrix(tracking_uri, reference.name, cell.hash)
    again = logged_matrix(tracking_uri, grid.name, cell.hash)
    assert np.array_equal(full, again)
    assert not np.isnan(again).any()
    for key, value in undisturbed.summary.items():  # fwt reads the checkpointed baseline
        if not key.endswith("time_s"):
            assert resumed.summary[key] == value, key

    # The resumed cell continued its own MLflow run: one step per experience, no repeats.
    client = MlflowClient(tracking_uri)
    run = client.get_run(interrupted_run)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc/exp_0")]
    assert steps == [0, 1, 2, 3, 4]


def test_interrupted_grid_finishes_the_rest_when_resubmitted(write_grid, tracking_uri, monkeypatch):
    grid = write_grid(seeds=[0, 1, 2], streams=FIVE, strategies=[REHEARSAL])
    original = Rehearsal.train
    calls = {"n": 0}

    def interrupted(self, experience):
        calls["n"] += 1
        if calls["n"] == 8:  # the second cell's third experience: Ctrl-C
            raise KeyboardInterrupt
        original(self, experience)

    monkeypatch.setattr(Rehearsal, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tracking_uri)
    monkeypatch.setattr(Rehearsal, "train", original)

    outcomes = run_grid(grid, tracking_uri)
    assert [o.status for o in outcomes] == ["SKIPPED", "FINISHED", "FINISHED"]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "FINISHED", "FINISHED"]  # the interrupted cell resumed its run
    parents = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'grid'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
