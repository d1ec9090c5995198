"""A cluster of three Ray nodes on this machine, as far as one machine can stand for many.

Ray's own `cluster_utils.Cluster` starts a head with no CPU for cells (as ray_cluster.yaml
sets it) and two worker nodes that declare one GPU each, which they do not have; the
cluster requires a token, as Ray's token authentication makes it. Checkpoints go to S3
served by moto (`moto_server`), cells log to an MLflow server. What the cells did (node,
device, GPU share, the experience a retry resumed at) is noted by a wrapper around the
runner's cell function, into a local folder: a test instrument, which works because all
three nodes share this machine's disk. Nothing of the platform is replaced.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.fs
import pytest
import ray
from mlflow import MlflowClient
from ray._private import ray_constants
from servers import free_port, wait_until_answers

from forgetless.experiments import checkpoint
from forgetless.experiments.cluster import connect, ray_executor
from forgetless.experiments.runner import checkpoint_path, local_executor, run_grid

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
BUCKET = "forgetless-test"
STORAGE = f"s3://{BUCKET}/forgetless"
# A lost node is declared dead after ~5 s of missed health checks, not Ray's default ~30 s.
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 5,
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """A local S3 server and the environment that points boto-style clients (pyarrow's
    S3FileSystem among them) at it, with a bucket made."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=out, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    if not wait_until_answers(f"{url}/moto-api/", server, 60):
        pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
    env = {
        "AWS_ENDPOINT_URL_S3": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    pyarrow.fs.S3FileSystem(
        endpoint_override=url, scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1", allow_bucket_creation=True,
    ).create_dir(BUCKET)  # fmt: skip
    yield env
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=15)


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("mlflow-server")
    url, _ = serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                    f"sqlite:///{folder / 'mlflow.db'}", "--host", "127.0.0.1",
                    "--port", "{port}", "--workers", "1"], folder)  # fmt: skip
    return url


class Nodes:
    def __init__(self, cluster, gpu_nodes: list) -> None:
        self.cluster = cluster
        self.head = cluster.head_node.node_id
        self.gpu_nodes = {node.node_id: node for node in gpu_nodes}


@pytest.fixture(scope="module")
def nodes(s3):
    """The three nodes, token authentication on, the S3 settings in every node's environment
    (worker processes inherit their raylet's); this process is connected as the driver."""
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        for key, value in s3.items():
            env.setenv(key, value)
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        env.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        reset_auth_token_state()  # this process reads the mode and token again
        head = {"num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            gpu_nodes = [cluster.add_node(num_cpus=8, num_gpus=1) for _ in range(2)]
            connect(cluster.address)  # the platform's own way in, its token probe included
            yield Nodes(cluster, gpu_nodes)
        finally:
            ray.shutdown()
            cluster.shutdown()
    reset_auth_token_state()


def noting(executor, folder: Path, storage: str, barrier: int = 0):
    """The executor, with each attempt at a cell noted in `folder` as it starts and ends:
    node, device, GPU ids and share, the experience it resumes at. With `barrier`, each
    attempt waits until that many have started, so that they run at once."""
    folder.mkdir(parents=True, exist_ok=True)
    where = str(folder)

    def execute(cells, fn):
        def attempt(cell, device=None, threads=None):
            # Runs in a Ray worker: everything it uses is imported here, not from this module.
            import json
            import os
            import time
            import uuid

            import ray

            from forgetless.experiments import checkpoint
            from forgetless.experiments.runner import checkpoint_path

            state = checkpoint.load(checkpoint_path(storage, cell))
            context = ray.get_runtime_context()
            note = {
                "cell": cell.hash,
                "node": context.get_node_id(),
                "device": device,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "resources": context.get_assigned_resources(),
                "resumes_at": state["next"] if state else 0,
                "start": time.time(),
            }
            path = os.path.join(where, f"{cell.hash}-{uuid.uuid4().hex}.json")

            def write_note() -> None:
                # Whole or not at all: the test reads these files while attempts write them.
                with open(path + ".partial", "w") as out:
                    json.dump(note, out)
                os.replace(path + ".partial", path)

            def started() -> int:
                return sum(name.endswith(".json") for name in os.listdir(where))

            write_note()
            deadline = time.time() + 120
            while barrier and started() < barrier and time.time() < deadline:
                time.sleep(0.05)
            outcome = fn(cell, device, threads)
            note["end"] = time.time()
            write_note()
            return outcome

        return executor(cells, attempt)

    return execute


def notes(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:  # at a tie an end sorts first: back to back is not at once
        running += step
        most = max(most, running)
    return most


def cell_runs(uri: str, grid_name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid_name)
    return client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run: key -> [(step, value)] as the store holds it, in step order."""
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def test_a_cluster_that_wants_a_token_is_named_at_once(nodes, tmp_path):
    """Before: a minute of InvalidAuthToken warnings, then "no Ray cluster answers"."""
    script = (
        "import sys, time\n"
        "from forgetless.experiments.cluster import ConfigError, connect\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    connect(sys.argv[1])\n"
        "except ConfigError as e:\n"
        "    print(f'{time.monotonic() - start:.2f}', e)\n"
        "else:\n"
        "    print('connected')\n"
    )
    # A driver of its own, with a home of its own: no ~/.ray/auth_token, no RAY_AUTH_*.
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = str(tmp_path)
    drivers = {
        "no token": bare,
        "wrong token": {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
    }
    started = {
        name: subprocess.Popen([sys.executable, "-c", script, nodes.cluster.address], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, env in drivers.items()
    }  # fmt: skip
    said = {name: p.communicate(timeout=120) for name, p in started.items()}
    for name, (out, err) in said.items():
        assert out and out.split()[0] != "connected", f"{name}: {out}{err[-2000:]}"
        seconds, message = out.split(" ", 1)
        assert float(seconds) < 10, f"{name}: {seconds} s"
        assert "InvalidAuthToken" in message
        assert "~/.ray/auth_token on the head node" in message and "ray get-auth-token" in message
    assert "requires token authentication and this driver sends no token" in said["no token"][0]
    assert (
        "Set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN" in said["no token"][0]
    )
    assert "refuses this driver's token, read from RAY_AUTH_TOKEN" in said["wrong token"][0]


def test_sixteen_cells_log_at_once_to_an_mlflow_server_and_lose_no_metric(
    nodes, server, write_grid, tmp_path
):
    strategies = ["naive", {"name": "rehearsal", "buffer": {"size": 50}}]
    grid = write_grid(seeds=list(range(8)), strategies=strategies, storage=STORAGE,
                      resources={"cpu": 1, "gpu": 0})  # fmt: skip
    assert len(grid.cells) == 16
    folder = tmp_path / "attempts"
    executor = noting(ray_executor(grid.resources, len(grid.cells)), folder, STORAGE, 16)
    outcomes = run_grid(grid, server, executor)
    assert [o.status for o in outcomes] == ["FINISHED"] * 16, [o.error for o in outcomes]

    attempts = notes(folder)
    assert len(attempts) == 16
    assert max(a["start"] for a in attempts) < min(a["end"] for a in attempts)  # all at once
    assert collections.Counter(a["node"] for a in attempts) == {n: 8 for n in nodes.gpu_nodes}

    client = MlflowClient(server)
    runs = cell_runs(server, grid.name)
    assert sorted(r.data.tags["forgetless.cell_hash"] for r in runs) == sorted(
        c.hash for c in grid.cells
    )
    # Every metric each cell logged, counted: a per-step one once after each of the two
    # experiences, a final one once; the same names for every cell, the contract's among them.
    contract = {"acc/exp_0", "acc/exp_1", "avg_acc", "memory_bytes", "train_time_s",
                "final/avg_acc", "final/learning_acc", "final/forgetting", "final/bwt",
                "final/fwt", "final/train_time_s", "final/memory_bytes"}  # fmt: skip
    names = None
    for run in runs:
        assert run.info.status == "FINISHED"
        logged = histories(client, run)
        names = names or set(logged)
        assert set(logged) == names and contract <= names
        for key, history in logged.items():
            steps = [0] if key.startswith("final/") else [0, 1]
            assert [step for step, _ in history] == steps, (key, history)


def test_fractional_gpu_cells_survive_a_lost_node_resuming_from_s3(
    nodes, server, write_grid, tmp_path, logged_matrix, one_thread
):
    fields = {
        "seeds": [0, 1],
        "streams": [{"name": "split_digits", "n_experiences": 5,
                     "fixed_class_order": list(range(10))}],
        "train": {"epochs": 15, "batch_size": 32, "lr": 0.05},
        "strategies": ["naive", {"name": "rehearsal", "buffer": {"size": 60}}],
    }  # fmt: skip
    grid = write_grid(storage=STORAGE, resources={"cpu": 1, "gpu": 0.5}, **fields)
    folder = tmp_path / "attempts"
    outcomes: list = []
    executor = noting(ray_executor(grid.resources, len(grid.cells)), folder, STORAGE)
    driver = threading.Thread(target=lambda: outcomes.extend(run_grid(grid, server, executor)))
    driver.start()

    # Lose a whole GPU node while one of its cells is in the middle of its stream.
    caught, deadline = None, time.monotonic() + 180
    while caught is None and time.monotonic() < deadline and driver.is_alive():
        for attempt in notes(folder):
            if "end" in attempt:
                continue
            with contextlib.suppress(checkpoint.UnreadableCheckpoint):
                cell = next(c for c in grid.cells if c.hash == attempt["cell"])
                state = checkpoint.load(checkpoint_path(grid.storage, cell))
                if state is not None and 1 <= state["next"] <= 2:
                    caught = attempt, state["next"]
                    break
        time.sleep(0.05)
    assert caught is not None, "no cell reached the middle of its stream"
    victim, killed_at = caught[0]["node"], time.time()
    lost = nodes.gpu_nodes[victim]
    # Its raylet and every process under it (the workers) at once, as when a machine dies, so
    # that no cell of the node trains on for a moment after its raylet is gone.
    raylet = psutil.Process(lost.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    for worker in raylet.children(recursive=True):
        worker.kill()
    nodes.cluster.remove_node(lost, allow_graceful=False)
    driver.join(timeout=300)
    assert not driver.is_alive()
    assert [o.status for o in outcomes] == ["FINISHED"] * 4, [o.error for o in outcomes]

    attempts = notes(folder)
    # Two cells share a GPU (never more), none runs on the head, and with no CUDA on these
    # nodes they train on the CPU.
    at_once = {
        node: most_at_once([(a["start"], a.get("end", killed_at)) for a in attempts
                            if a["node"] == node])
        for node in nodes.gpu_nodes
    }  # fmt: skip
    assert max(at_once.values()) == 2 and min(at_once.values()) >= 1, at_once
    for attempt in attempts:
        assert attempt["node"] in nodes.gpu_nodes and attempt["node"] != nodes.head
        assert attempt["gpu_ids"] == ["0"] and attempt["resources"]["GPU"] == 0.5
        assert attempt["device"] == "cpu"
    logs = Path(nodes.cluster.head_node.get_session_dir_path(), "logs")
    said = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    assert "CUDA is not available there (torch.cuda.is_available() is False): training on " \
           "the CPU" in said  # fmt: skip
    # The cells the lost node was running ran once more, on the other node; the one caught
    # mid-stream resumed from its checkpoint on S3, not from the start.
    killed = [a for a in attempts if "end" not in a]
    assert caught[0] in killed and all(a["node"] == victim for a in killed)
    for attempt in killed:
        (again,) = [a for a in attempts if a["cell"] == attempt["cell"] and a is not attempt]
        assert again["node"] != victim and "end" in again
        if attempt == caught[0]:
            assert again["resumes_at"] >= caught[1], (again, caught)

    runs = cell_runs(server, grid.name)
    assert sorted((r.data.tags["forgetless.cell_hash"], r.info.status) for r in runs) == sorted(
        (c.hash, "FINISHED") for c in grid.cells
    )  # one run per cell, FINISHED once

    # The same cells undisturbed, in this process, with local checkpoints.
    reference = write_grid(name=grid.name + "-reference", storage=str(tmp_path / "reference"),
                           **fields)  # fmt: skip
    assert [o.status for o in run_grid(reference, server, local_executor)] == ["FINISHED"] * 4
    client = MlflowClient(server)
    twins = {r.data.tags["forgetless.cell_hash"]: r for r in cell_runs(server, reference.name)}
    differ = []
    for run in runs:
        cell_hash = run.data.tags["forgetless.cell_hash"]
        assert np.array_equal(
            logged_matrix(server, grid.name, cell_hash),
            logged_matrix(server, reference.name, cell_hash),
        )
        killed_run, undisturbed = histories(client, run), histories(client, twins[cell_hash])
        assert set(killed_run) == set(undisturbed)
        for key in killed_run:  # timings differ; every other value is to be the same
            if not key.endswith("time_s") and killed_run[key] != undisturbed[key]:
                differ.append((cell_hash, key, killed_run[key], undisturbed[key]))
    assert not differ
