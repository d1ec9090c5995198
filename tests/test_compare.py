"""`forgetless compare` over one grid or several, read without importing MLflow.

The store here is written run by run with MlflowClient, as the tracker writes it (the
contract of docs/mlflow.md), so every number in the table is known in advance and no test
waits for training.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from forgetless.experiments import tracking
from forgetless.experiments.cli import main
from forgetless.experiments.compare import cell_frame, compare_table, mean_accuracy_matrices

TAG = tracking.TAG
PNG = b"\x89PNG\r\n\x1a\n"
# grid -> (strategy, seed, final metrics, train.lr) of each FINISHED cell
CELLS = {
    "alpha": [
        ("naive", 0, {"avg_acc": 0.20, "forgetting": 0.90, "memory_bytes": 0.0}, "0.05"),
        ("naive", 1, {"avg_acc": 0.22, "forgetting": 0.88, "memory_bytes": 0.0}, "0.05"),
        ("rehearsal", 0, {"avg_acc": 0.80, "forgetting": 0.10, "memory_bytes": 500.0}, "0.05"),
        ("rehearsal", 1, {"avg_acc": 0.82, "forgetting": 0.12, "memory_bytes": 500.0}, "0.05"),
    ],
    "beta": [
        ("rehearsal", 0, {"avg_acc": 0.70, "forgetting": 0.30, "memory_bytes": 200.0}, "0.1"),
        ("rehearsal", 1, {"avg_acc": 0.74, "forgetting": 0.26, "memory_bytes": 200.0}, "0.1"),
        (
            "cumulative",
            0,
            {"avg_acc": 0.95, "forgetting": 0.02, "memory_bytes": math.nan},
            "0.1",
        ),  # fmt: skip
    ],
}


def log_cell(client: MlflowClient, experiment_id: str, grid: str, strategy: str, seed: int,
             final: dict[str, float], lr: str, status: str = "FINISHED") -> str:  # fmt: skip
    """A cell run with the tags, params and final metrics the tracker gives one."""
    tags = {f"{TAG}role": "cell", f"{TAG}grid": grid, f"{TAG}stream": "split_digits",
            f"{TAG}strategy": strategy, f"{TAG}seed": str(seed), f"{TAG}variant": "-",
            f"{TAG}cell_hash": f"{grid}-{strategy}-{seed}"}  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"split_digits/{strategy} seed={seed}",
                            tags=tags)  # fmt: skip
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(f"final/{k}", v, now, 0) for k, v in final.items()]
        + [Metric("avg_acc", 0.5, now, 0)],  # a per-step metric: not in the table
        params=[Param("train.lr", lr), Param("seed", str(seed))],
    )
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Two grids in one SQLite store, plus runs that compare must leave out: a FAILED cell,
    a RUNNING one, a deleted one and a group run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"
    client = MlflowClient(uri)
    for grid, cells in CELLS.items():
        experiment_id = client.create_experiment(grid)
        for strategy, seed, final, lr in cells:
            log_cell(client, experiment_id, grid, strategy, seed, final, lr)
    beta = client.get_experiment_by_name("beta").experiment_id
    bad = {"avg_acc": 0.0, "forgetting": 0.0, "memory_bytes": 0.0}
    log_cell(client, beta, "beta", "naive", 0, bad, "0.1", status="FAILED")
    log_cell(client, beta, "beta", "naive", 1, bad, "0.1", status="RUNNING")
    client.delete_run(log_cell(client, beta, "beta", "naive", 2, bad, "0.1"))
    group = client.create_run(beta, tags={f"{TAG}role": "group", f"{TAG}strategy": "naive"})
    client.set_terminated(group.info.run_id, "FINISHED")
    return uri


def comparable(cells: list[tracking.CellRecord]) -> list[tuple]:
    """Records as tuples, NaN as a string (NaN is unequal to itself)."""
    return [
        (
            c.grid,
            c.run_id,
            c.tags,
            {k: "nan" if math.isnan(v) else v for k, v in c.final.items()},
            c.params,
        )  # fmt: skip
        for c in cells
    ]


def test_sqlite_store_is_read_as_mlflow_search_runs_reads_it(store):
    path = tracking.sqlite_path(store)
    fast = tracking._read_sqlite_cells(path, store, ["alpha", "beta"])
    assert comparable(fast) == comparable(tracking._search_cells(store, ["alpha", "beta"]))
    assert len(fast) == 7  # FINISHED cells only
    cumulative = next(c for c in fast if c.tags[f"{TAG}strategy"] == "cumulative")
    assert math.isnan(cumulative.final["final/memory_bytes"])  # unknown, not MLflow's stored 0
    assert set(cumulative.final) == {"final/avg_acc", "final/forgetting", "final/memory_bytes"}


def test_compare_reads_a_sqlite_store_without_mlflow_torch_or_matplotlib(store):
    script = (
        "import sys\n"
        "from forgetless.experiments.cli import main\n"
        f"assert main(['compare', 'alpha', 'beta', '--tracking-uri', {store!r}]) == 0\n"
        "heavy = sorted(m for m in ('mlflow', 'torch', 'matplotlib', 'ray', 'scipy') "
        "if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy: []"), done.stdout


def test_two_grids_make_one_table_each_row_naming_its_grid(store, capsys):
    table = compare_table(store, ["alpha", "beta"])
    rows = list(zip(table["grid"], table["strategy"]))
    assert rows == [("beta", "cumulative"), ("alpha", "rehearsal"), ("beta", "rehearsal"),
                    ("alpha", "naive")]  # fmt: skip
    assert list(table["seeds"]) == [1, 2, 2, 2]
    assert table["avg_acc_mean"].tolist() == pytest.approx([0.95, 0.81, 0.72, 0.21])
    assert main(["compare", "alpha", "beta", "--tracking-uri", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["grid", "stream", "strategy"]
    assert [line.split()[:3] for line in lines[1:]] == [
        [grid, "split_digits", strategy] for grid, strategy in rows
    ]


def test_one_grid_has_no_grid_column(store, capsys):
    assert main(["compare", "alpha", "--tracking-uri", store]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["stream", "strategy"]
    assert len(lines) == 3


def test_filters_and_sort_work_across_grids(store, capsys):
    both = ["alpha", "beta"]
    replay = compare_table(store, both, strategies=["rehearsal"], sort="final/forgetting")
    assert list(zip(replay["grid"], replay["forgetting_mean"].round(3))) == [
        ("alpha", 0.11), ("beta", 0.28)]  # fmt: skip
    fast = compare_table(store, both, where=[("train.lr", ">", "0.05")])
    assert set(fast["grid"]) == {"beta"} and set(fast["strategy"]) == {"rehearsal", "cumulative"}
    lean = compare_table(store, both, sort="final/memory_bytes")
    assert list(zip(lean["grid"], lean["strategy"]))[-1] == ("beta", "cumulative")  # unknown
    assert main(["compare", *both, "--tracking-uri", store, "--strategy", "rehersal"]) == 2
    err = capsys.readouterr().err
    assert 'did you mean "rehearsal"' in err
    assert "these grids have cumulative, naive, rehearsal" in err
    assert main(["compare", *both, "--tracking-uri", store, "--sort", "final/forgeting"]) == 2
    err = capsys.readouterr().err
    assert "not a final metric of 'alpha', 'beta'" in err and '"final/forgetting"' in err


def test_unknown_grid_names_the_grids_that_exist(store, capsys):
    assert main(["compare", "alpha", "betta", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert f"no grid named 'betta' in {store}; grids there: alpha, beta" in err
    assert 'did you mean "beta"' in err


def test_a_grid_is_named_by_its_yaml_file_too(store, tmp_path, capsys):
    grid_file = tmp_path / "beta.yaml"
    grid_file.write_text("name: beta\nseeds: [0]\n")
    assert main(["compare", "alpha", str(grid_file), "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "beta" in out and "cumulative" in out and "alpha" in out
    assert main(["compare", str(tmp_path / "missing.yaml"), "--tracking-uri", store]) == 2
    assert "missing.yaml: no such grid file" in capsys.readouterr().err


def test_mean_accuracy_matrix_of_a_group_is_the_mean_of_its_seeds():
    cells = pd.DataFrame({
        "stream": ["s"] * 5, "strategy": ["naive", "naive", "rehearsal", "rehearsal", "lwf"],
        "variant": ["-"] * 5, "seed": [0, 1, 0, 1, 0], "run_id": ["a", "b", "c", "d", "e"],
    })  # fmt: skip
    matrices = {"a": np.array([[1.0, 0.0], [0.2, 0.8]]), "b": np.array([[0.8, 0.0], [0.4, 0.6]]),
                "c": np.array([[0.9, 0.1], [0.7, 0.9]])}  # fmt: skip
    means = mean_accuracy_matrices(cells, matrices)
    assert set(means) == {("s", "naive", "-"), ("s", "rehearsal", "-")}  # lwf: no matrix
    np.testing.assert_allclose(means[("s", "naive", "-")], [[0.9, 0.0], [0.3, 0.7]])
    np.testing.assert_allclose(means[("s", "rehearsal", "-")], matrices["c"])  # d has none


def test_run_gives_parent_and_group_runs_the_report_and_mean_figures(write_grid, tmp_path,
                                                                      capsys):  # fmt: skip
    from forgetless.experiments.plots import accuracy_heatmap

    grid = write_grid(seeds=[0, 1], strategies=["naive", "cumulative"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(tmp_path / f"{grid.name}.yaml"), "--tracking-uri", uri,
                 "--no-ray"]) == 0  # fmt: skip
    capsys.readouterr()
    client = MlflowClient(uri)
    parent, groups = tracking.summary_runs(uri, grid.name)
    assert {path.path for path in client.list_artifacts(parent)} >= {
        "grid.yaml", "report.html", "report.md", "report_files"}  # fmt: skip
    figures = {path.path for path in client.list_artifacts(parent, "report_files")}
    assert {"report_files/heatmaps-split_digits.png",
            "report_files/curves-split_digits.png"} <= figures  # fmt: skip
    assert sorted(groups) == [("split_digits", "cumulative", "-"), ("split_digits", "naive", "-")]
    cells = cell_frame(uri, grid.name)
    seeds_matrices = {  # read through MLflow's client, not the code under test
        r: json.loads(Path(client.download_artifacts(r, "accuracy_matrix.json", str(tmp_path)))
                      .read_text()) for r in cells["run_id"]}  # fmt: skip
    for (stream, strategy, _), run_id in groups.items():
        folder = tmp_path / run_id
        folder.mkdir()
        client.download_artifacts(run_id, "", str(folder))
        assert {p.name for p in folder.iterdir()} == {
            "report.html",
            "accuracy_matrix.json",
            "accuracy_matrix.png",
            "average_accuracy.png",
        }
        assert (folder / "report.html").read_text().startswith("<!doctype html>")
        assert (folder / "average_accuracy.png").read_bytes().startswith(PNG)
        ids = cells.loc[cells["strategy"] == strategy, "run_id"]
        expected = np.mean([seeds_matrices[r]["R"] for r in ids], axis=0)
        logged = json.loads((folder / "accuracy_matrix.json").read_text())
        np.testing.assert_allclose(logged["R"], expected)
        assert logged["seeds"] == 2 and len(logged["experiences"]) == 2
        # The heatmap is the mean matrix's: drawn again from the seeds' mean, the same bytes.
        drawn = tmp_path / f"{strategy}.png"
        accuracy_heatmap(expected, logged["experiences"], f"{stream}/{strategy}: mean over 2 "
                         "seeds", drawn)  # fmt: skip
        assert (folder / "accuracy_matrix.png").read_bytes() == drawn.read_bytes()


def runs_by_role(uri: str, grid_name: str) -> dict[str, list]:
    """The grid's runs by `forgetless.role`, deleted ones under `<role> (deleted)`."""
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    found: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
        role = run.data.tags[f"{TAG}role"]
        found.setdefault(role if run.info.lifecycle_stage == "active" else f"{role} (deleted)",
                         []).append(run)  # fmt: skip
    return found


def assert_tree(runs: dict[str, list], parent_id: str) -> None:
    """parent -> group -> cells, as the MLflow UI nests them: every group under `parent_id`,
    every cell under the live group of its stream, strategy and variant."""
    key_tags = [f"{TAG}stream", f"{TAG}strategy", f"{TAG}variant"]
    groups = {tuple(g.data.tags[k] for k in key_tags): g for g in runs["group"]}
    assert len(groups) == len(runs["group"])
    assert {g.data.tags["mlflow.parentRunId"] for g in groups.values()} == {parent_id}
    for cell in runs["cell"]:
        group = groups[tuple(cell.data.tags[k] for k in key_tags)]
        assert cell.data.tags["mlflow.parentRunId"] == group.info.run_id, cell.info.run_name


def test_cells_nest_under_their_group_run_and_move_to_the_rebuilt_one(write_grid, tmp_path,
                                                                       capsys):  # fmt: skip
    from forgetless.experiments import report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = write_grid(seeds=[0, 1], strategies=["naive", "cumulative"])
    command = ["run", str(tmp_path / f"{grid.name}.yaml"), "--tracking-uri", uri, "--no-ray"]
    assert main(command) == 0
    first = runs_by_role(uri, grid.name)
    (parent,) = first["grid"]
    assert len(first["cell"]) == 4 and len(first["group"]) == 2
    assert_tree(first, parent.info.run_id)

    # A third seed: the four finished cells are skipped, the groups rebuilt under the new
    # submission, and every cell moves under its new group; the old groups are deleted.
    write_grid(name=grid.name, seeds=[0, 1, 2], strategies=["naive", "cumulative"])
    capsys.readouterr()
    assert main(command) == 0
    assert "2 cells run, 4 already finished, 0 failed" in capsys.readouterr().out
    second = runs_by_role(uri, grid.name)
    (resubmission,) = [p for p in second["grid"] if p.info.run_id != parent.info.run_id]
    assert len(second["cell"]) == 6 and len(second["group"]) == 2
    assert {c.info.run_id for c in first["cell"]} < {c.info.run_id for c in second["cell"]}
    assert {g.info.run_id for g in second["group (deleted)"]} == {
        g.info.run_id for g in first["group"]}  # fmt: skip
    assert {g.data.tags[f"{TAG}seeds"] for g in second["group"]} == {"3"}
    assert_tree(second, resubmission.info.run_id)
    # Which submission ran a cell stays on it, and the report finds the grid file by it.
    drivers = {c.info.run_id: c.data.tags[f"{TAG}driver"] for c in second["cell"]}
    assert sorted(drivers.values()) == sorted([parent.info.run_id] * 4
                                              + [resubmission.info.run_id] * 2)  # fmt: skip
    grid_file = MlflowClient(uri).download_artifacts(resubmission.info.run_id, "grid.yaml",
                                                     str(tmp_path))  # fmt: skip
    recorded = report.read_recorded(uri, grid.name, cell_frame(uri, grid.name))
    assert recorded.grid_file == Path(grid_file).read_text()
