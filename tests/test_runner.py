"""A small grid run into a temporary MLflow store and read back through MLflow's API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from forgetless.core.schema import ConfigError
from forgetless.experiments import metrics
from forgetless.experiments.compare import compare_table
from forgetless.experiments.runner import run_grid

CONTRACT_TAGS = ["cell_hash", "stream", "strategy", "seed", "grid", "role"]
FINAL = ["avg_acc", "learning_acc", "forgetting", "bwt", "fwt", "train_time_s", "memory_bytes"]


def runs_by_role(uri: str, grid_name: str) -> dict[str, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags["forgetless.role"], []).append(run)
    return out


def test_grid_runs_and_reads_back_under_the_mlflow_contract(write_grid, tracking_uri, tmp_path):
    grid = write_grid(
        seeds=[0, 1],
        strategies=["naive", {"name": "rehearsal", "buffer": {"size": 50}}],
    )
    outcomes = run_grid(grid, tracking_uri)
    assert [o.status for o in outcomes] == ["FINISHED"] * 4

    runs = runs_by_role(tracking_uri, grid.name)
    (parent,) = runs["grid"]
    assert parent.info.status == "FINISHED"
    cells = runs["cell"]
    assert len(cells) == 4
    # parent run -> one group run per strategy -> its seeds' cell runs
    groups = {run.data.tags["forgetless.strategy"]: run for run in runs["group"]}
    assert sorted(groups) == ["naive", "rehearsal"]
    assert all(g.data.tags["mlflow.parentRunId"] == parent.info.run_id for g in groups.values())
    client = MlflowClient(tracking_uri)
    for run in cells:
        assert run.info.status == "FINISHED"
        group = groups[run.data.tags["forgetless.strategy"]]
        assert run.data.tags["mlflow.parentRunId"] == group.info.run_id
        for tag in CONTRACT_TAGS:
            assert f"forgetless.{tag}" in run.data.tags
        assert run.data.params["train.lr"] == "0.05"
        for key in FINAL:
            assert f"final/{key}" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "acc/exp_0")
        assert [m.step for m in history] == [0, 1]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "accuracy_matrix.json", "accuracy_matrix.png"} <= artifacts
        # The logged final metrics are the metrics of the logged matrix.
        path = client.download_artifacts(run.info.run_id, "accuracy_matrix.json", str(tmp_path))
        matrix = json.loads(Path(path).read_text())
        R = np.array(matrix["R"])
        assert run.data.metrics["final/avg_acc"] == pytest.approx(metrics.average_accuracy(R))
        assert run.data.metrics["final/forgetting"] == pytest.approx(metrics.forgetting(R))
        assert run.data.metrics["final/fwt"] == pytest.approx(
            metrics.forward_transfer(R, matrix["baseline"])
        )
    # One group run per (stream, strategy) with mean and std over the two seeds.
    groups = {r.data.tags["forgetless.strategy"]: r for r in runs["group"]}
    assert set(groups) == {"naive", "rehearsal"}
    naive = [r.data.metrics["final/avg_acc"] for r in cells
             if r.data.tags["forgetless.strategy"] == "naive"]  # fmt: skip
    assert groups["naive"].data.metrics["final/avg_acc_mean"] == pytest.approx(np.mean(naive))
    assert groups["naive"].data.metrics["final/avg_acc_std"] == pytest.approx(np.std(naive, ddof=1))

    table = compare_table(tracking_uri, grid.name)
    assert list(table["seeds"]) == [2, 2]


def test_resubmitting_a_finished_grid_runs_nothing(write_grid, tracking_uri):
    grid = write_grid()
    assert [o.status for o in run_grid(grid, tracking_uri)] == ["FINISHED"]
    assert [o.status for o in run_grid(grid, tracking_uri)] == ["SKIPPED"]
    assert len(runs_by_role(tracking_uri, grid.name)["cell"]) == 1


def test_diverging_cell_fails_with_reason_while_the_grid_goes_on(write_grid, tracking_uri):
    grid = write_grid(train={"epochs": 1, "lr": 1e30}, strategies=["naive"],
                      grid={"train.lr": [1e30, 0.05]})  # fmt: skip
    outcomes = run_grid(grid, tracking_uri)
    assert sorted(o.status for o in outcomes) == ["FAILED", "FINISHED"]
    failed = [r for r in runs_by_role(tracking_uri, grid.name)["cell"]
              if r.info.status == "FAILED"]  # fmt: skip
    assert len(failed) == 1
    assert "NonFiniteLoss" in failed[0].data.tags["forgetless.error"]
    assert "train.lr" in failed[0].data.tags["forgetless.error"]


def test_unreachable_tracking_server_is_refused_before_any_cell(write_grid, tmp_path):
    grid = write_grid()
    with pytest.raises(ConfigError, match="no MLflow server answers"):
        run_grid(grid, "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="does not exist or is not writable"):
        run_grid(grid, f"sqlite:///{tmp_path}/missing/folder/mlflow.db")
    assert not (tmp_path / "runs").exists()


def test_unwritable_storage_is_refused_before_any_cell(write_grid, tracking_uri, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    grid = write_grid(storage=str(blocker / "runs"))
    with pytest.raises(ConfigError, match="storage: cannot write checkpoints"):
        run_grid(grid, tracking_uri)
    assert MlflowClient(tracking_uri).get_experiment_by_name(grid.name) is None


def learning_rates_per_step(samples: int, **train) -> list[float]:
    """The rate of every optimizer step of a linear model trained on two experiences."""
    import torch

    from forgetless.strategies import TrainConfig
    from forgetless.strategies.naive import Naive
    from forgetless.streams import Experience, Samples, Stream

    data = Samples(torch.randn(samples, 3), torch.randint(0, 2, (samples,)))
    experiences = [Experience(i, f"e{i}", data, data) for i in range(2)]
    stream = Stream("s", "class", experiences, num_classes=2)
    strategy = Naive(torch.nn.Linear(3, 2), None, TrainConfig(epochs=2, lr=0.1, **train), stream)
    seen = []
    strategy.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append(opt.param_groups[0]["lr"])
    )
    for experience in experiences:
        strategy.train(experience)
    return seen


def test_warm_up_raises_the_learning_rate_linearly_at_the_start_of_every_experience():
    seen = learning_rates_per_step(12, batch_size=2, warmup_steps=4)
    ramp = [0.025, 0.05, 0.075, 0.1] + [0.1] * 8  # 12 steps: 2 epochs of 6 batches
    assert seen == pytest.approx(ramp + ramp)


def test_cosine_decay_falls_from_the_warmed_up_rate_to_zero_within_every_experience():
    import math

    seen = learning_rates_per_step(10, batch_size=4, warmup_steps=2, decay="cosine")
    # 6 steps (2 epochs of 3 batches, the last one short): 2 of warm-up, then a cosine over
    # the remaining 4, from the full rate at step 2 down towards 0
    schedule = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx(schedule + schedule)
    assert schedule[-1] < 0.015


def test_progress_bar_counts_every_cell_when_it_draws_it(write_grid, tracking_uri, capsys):
    from forgetless.experiments.cli import main

    grid = write_grid(strategies=["naive", "cumulative"])
    path = f"{grid.storage.rsplit('/', 1)[0]}/{grid.name}.yaml"
    assert main(["run", path, "--no-ray", "--tracking-uri", tracking_uri]) == 0
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bars if "2/2" in line]
    assert final and all("done=2" in line for line in final)


def test_a_gpu_cell_reports_its_peak_memory_and_a_cpu_cell_none(monkeypatch):
    import torch

    from forgetless.experiments import runner

    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20)
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")
    runner._reset_peak_memory(gpu)
    runner._reset_peak_memory(cpu)
    assert reset == [gpu]
    assert runner._peak_memory(gpu) == {"peak_gpu_memory_mb": 3.0}
    assert runner._peak_memory(cpu) == {}


def test_two_configurations_of_one_strategy_stay_apart_in_compare_and_groups(
    write_grid, tracking_uri
):
    grid = write_grid(
        seeds=[0, 1],
        strategies=[
            {"name": "rehearsal", "buffer": {"size": 20}},
            {"name": "rehearsal", "buffer": {"size": 80}},
        ],
    )
    assert {o.status for o in run_grid(grid, tracking_uri)} == {"FINISHED"}
    table = compare_table(tracking_uri, grid.name)
    assert sorted(table["variant"]) == ["strategy.buffer.size=20", "strategy.buffer.size=80"]
    assert list(table["seeds"]) == [2, 2]
    groups = runs_by_role(tracking_uri, grid.name)["group"]
    assert sorted(g.data.tags["forgetless.variant"] for g in groups) == sorted(table["variant"])


def test_the_mlflow_ui_gets_the_setup_kind_commit_and_group_configs(write_grid, tracking_uri):
    grid = write_grid(seeds=[0, 1], grid={"train.lr": [0.05, 0.1]})
    run_grid(grid, tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert grid.name in experiment.tags["mlflow.note.content"]
    runs = runs_by_role(tracking_uri, grid.name)
    commits = {r.data.tags["mlflow.source.git.commit"]
               for r in runs["grid"] + runs["cell"] + runs["group"]}  # fmt: skip
    (commit,) = commits  # one commit of this checkout, on every run
    known = subprocess.run(["git", "cat-file", "-t", commit], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    assert known == "commit"
    by_lr = {g.data.params["train.lr"]: g for g in runs["group"]}  # filterable by train.lr
    assert set(by_lr) == {"0.05", "0.1"}
    assert "seed" not in by_lr["0.1"].data.params
