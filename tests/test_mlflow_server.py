"""A grid logged over HTTP to a real MLflow server, read back through the server's REST API,
then compared and reported from the server's URI."""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request

import pytest

from forgetless.experiments import report
from forgetless.experiments.cli import main
from forgetless.experiments.compare import compare_table
from forgetless.experiments.runner import run_grid

pytestmark = pytest.mark.integration  # starts an MLflow server

CONTRACT_TAGS = ["cell_hash", "stream", "strategy", "seed", "grid", "role"]


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory) -> str:
    """`mlflow server` on a SQLite store, artifacts proxied into its folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    url, _ = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                    f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1",
                    "--port", "{port}", "--workers", "1"], folder)  # fmt: skip
    return url


@pytest.fixture(scope="module")
def served_grid(server, make_grid):
    grid = make_grid(
        seeds=[0, 1], strategies=["naive", {"name": "rehearsal", "buffer": {"size": 50}}]
    )
    assert {o.status for o in run_grid(grid, server)} == {"FINISHED"}
    return grid


def rest(server: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{server}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_grid_logged_over_http_reads_back_through_the_rest_api(server, served_grid):
    experiment = rest(server, "experiments/get-by-name", experiment_name=served_grid.name)
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = rest(server, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})
    by_role: dict[str, list] = {}
    for run in runs["runs"]:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        by_role.setdefault(tags["forgetless.role"], []).append((run, tags))
    assert {role: len(r) for role, r in by_role.items()} == {"grid": 1, "cell": 4, "group": 2}
    ((parent, _),) = by_role["grid"]
    parent_id = parent["info"]["run_id"]
    # parent run -> one group run per strategy -> its seeds' cell runs
    groups = {tags["forgetless.strategy"]: run["info"]["run_id"] for run, tags in by_role["group"]}
    assert len(groups) == 2
    for run, tags in by_role["cell"] + by_role["group"]:
        assert run["info"]["status"] == "FINISHED"
        role, strategy = tags["forgetless.role"], tags["forgetless.strategy"]
        assert tags["mlflow.parentRunId"] == (parent_id if role == "group" else groups[strategy])
    for run, tags in by_role["cell"]:
        assert all(f"forgetless.{tag}" in tags for tag in CONTRACT_TAGS)
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["train.lr"] == "0.05"
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"final/avg_acc", "final/forgetting", "avg_acc", "acc/exp_1"} <= metrics
        listed = rest(server, "artifacts/list", run_id=run["info"]["run_id"])
        assert "accuracy_matrix.json" in {f["path"] for f in listed["files"]}
    # The REST filter a user types in the UI's search box.
    rehearsal = rest(server, "runs/search", {
        "experiment_ids": [experiment_id],
        "filter": "tags.forgetless.role = 'cell' and tags.forgetless.strategy = 'rehearsal'",
    })  # fmt: skip
    assert len(rehearsal["runs"]) == 2
    history = rest(server, "metrics/get-history",
                   run_id=rehearsal["runs"][0]["info"]["run_id"], metric_key="avg_acc")  # fmt: skip
    assert [m["step"] for m in history["metrics"]] == [0, 1]


def test_compare_report_and_ui_read_the_server_store(server, served_grid, tmp_path, capsys):
    table = compare_table(server, served_grid.name, sort="final/forgetting")
    assert sorted(table["strategy"]) == ["naive", "rehearsal"]
    built = report.build(server, served_grid.name)  # artifacts come through the server's proxy
    heatmaps = next(s for s in built.sections if s.key == "heatmaps")
    assert len(heatmaps.images) == 1
    assert main(["ui", served_grid.name, "--tracking-uri", server]) == 0
    out = capsys.readouterr().out
    experiment = rest(server, "experiments/get-by-name", experiment_name=served_grid.name)
    assert f"its UI is at {server}/#/experiments/{experiment['experiment']['experiment_id']}" in out
