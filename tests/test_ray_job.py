"""`ray job submit --working-dir . -- forgetless run GRID` against a `ray start --head` cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.integration  # starts a Ray head

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(folder: str, port: int) -> None:
    """Stop the processes of the cluster with temp dir `folder` and GCS `port`, and only
    those: `ray stop` would stop every Ray of the user on this machine, a grid or benchmark
    running beside the tests too. The head's processes name the folder or the port on
    their command line; the agents they start (renamed `ray::...`) are their children."""
    import psutil

    def of_cluster(p: psutil.Process) -> bool:
        return any(folder in arg or arg.endswith(f":{port}") for arg in p.info["cmdline"] or ())

    processes = {p for p in psutil.process_iter(["cmdline"]) if of_cluster(p)}
    processes |= {child for p in list(processes) for child in p.children(recursive=True)}
    for p in processes:
        p.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)  # some ignore SIGTERM for good
    for p in alive:
        p.kill()


@pytest.fixture
def head_node():
    """A one-node Ray cluster on localhost, as `ray start --head` makes it, in a temp dir of
    its own (short: Ray's socket paths must fit in 107 bytes), stopped alone at the end."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # A head that fails to start is tried once more on new ports: it failed once in a full
    # run, cause not caught (a port chosen here can be taken before Ray binds it).
    for _ in range(2):
        port, dashboard = free_port(), free_port()
        folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        # Every port its own: the defaults (the job agent's 52365, the client server's
        # 10001, ...) are taken by any other Ray on the machine, and the job agent then
        # never comes up.
        ports = [f"--{name}-port={free_port()}" for name in (
            "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
            "metrics-export", "ray-client-server")]  # fmt: skip
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=true", f"--dashboard-port={dashboard}",
             "--disable-usage-stats", f"--temp-dir={folder}", *ports],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        if started.returncode == 0:
            break
        stop_cluster(folder, port)
        shutil.rmtree(folder, ignore_errors=True)
    assert started.returncode == 0, (
        f"ray start:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
    )
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():  # this Ray version authenticates job submission with a token
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token.read_text().strip())
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(folder, port)
        shutil.rmtree(folder, ignore_errors=True)


def test_ray_job_submit_runs_a_grid_on_the_cluster(head_node, tmp_path):
    address, env = head_node
    grid = {
        "name": "job-submit",
        "seeds": [0, 1],
        "streams": [{"name": "split_digits", "n_experiences": 2}],
        "train": {"epochs": 1},
        "strategies": ["naive"],
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The head's job agent registers some seconds after `ray start`, a minute or more on a
    # loaded machine; until then the submission fails with this message (on either stream).
    deadline = time.monotonic() + 240
    while True:
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
             "--", "forgetless", "run", "grid.yaml", "--address", "auto", "--tracking-uri", uri],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        waiting = "No available agent to submit job" in job.stdout + job.stderr
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "2 cells run" in job.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("job-submit")
    runs = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
