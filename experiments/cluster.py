"""Cells on Ray: one Ray core task per cell.

Why core tasks and not Ray Tune: a cell is a function run to completion, not a trial to
tune. `@ray.remote(max_retries=...)` gives scheduling by resources (fractional GPUs
included), retries when a worker or node dies, and reused worker processes (a few ms
per task instead of Tune's fresh process per trial), in a few lines. Resume does not
need Tune's restore either: a retried task calls the same `run_cell`, which picks up
the cell's checkpoint by hash, and a resubmitted grid skips FINISHED cells by hash.

Failures split in two: a worker that dies (SIGKILL, OOM killer, lost node) is an
infrastructure failure that Ray retries; an exception inside the cell (a diverging
loss, a bug) is a code failure that `run_cell` records as FAILED and Ray does not retry.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import ray

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import Cell, Resources

if TYPE_CHECKING:  # the runner brings torch and MLflow: connect() does without them
    from forgetless.experiments.runner import CellOutcome

log = logging.getLogger(__name__)
MAX_RETRIES = 3  # worker deaths per cell before it is reported lost
# Raised by Ray's token authentication (RAY_AUTH_MODE=token); Rays without it lack the class.
_AuthenticationError = getattr(ray.exceptions, "AuthenticationError", ())


def connect(address: str | None) -> None:
    """Reach the cluster at `address` (or $RAY_ADDRESS), else start Ray in this process."""
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    try:
        if address:
            _check_reachable(address)
            _check_token(address)
            ray.init(address=address, log_to_driver=False)
        else:
            # Workers see what the driver sees (a plugin module beside the grid, say). Set
            # through the environment, not a runtime_env, which would discard the workers
            # Ray prestarts; address="local" never joins another `ray start` on the machine.
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    except _AuthenticationError as e:  # token mode on, but no token anywhere
        raise ConfigError(f"--address {address!r}: {e}") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"--address {address!r}: no Ray cluster answers ({e}); start one with "
            "`ray start --head` or `ray up ray_cluster.yaml`, or drop --address to run "
            "on this machine"
        ) from e


def _check_reachable(address: str) -> None:
    """A TCP probe first: ray.init retries an address that nobody answers for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"cannot connect to {host}:{port}: {e}") from e


def _check_token(address: str) -> None:
    """One call to the cluster's GCS carrying the token ray.init would send (none unless
    RAY_AUTH_MODE=token). A cluster started with token authentication answers it at once
    with UNAUTHENTICATED, where ray.init retries for a minute of InvalidAuthToken warnings
    and then says only that it failed to connect. Any other answer is left to ray.init.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return  # "auto" finds ~/.ray/auth_token by itself; a Ray Client server is no GCS
    try:
        import grpc
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            SyncAuthenticationMetadataClientInterceptor,
        )
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # a Ray without token authentication: nothing to probe
        return
    channel = grpc.intercept_channel(
        grpc.insecure_channel(address), SyncAuthenticationMetadataClientInterceptor()
    )
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise ConfigError(token_advice(address, e.details() or "")) from None
    finally:
        channel.close()


def token_advice(address: str, answer: str) -> str:
    """What to do when the cluster at `address` refuses this driver's token (or its lack)."""
    mode = os.environ.get("RAY_AUTH_MODE", "")
    where = (
        "copy the token from ~/.ray/auth_token on the head node (`ray get-auth-token` there "
        "prints it)"
    )
    if mode.lower() != "token":
        unsent = (
            " (RAY_AUTH_TOKEN is set, but Ray sends it only when RAY_AUTH_MODE=token)"
            if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            else ""
        )
        return (
            f"--address {address!r}: the Ray cluster there requires token authentication "
            f"and this driver sends no token{unsent} (the cluster answered: {answer}). Set "
            "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or in a file "
            f"named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token on this machine): {where}"
        )
    if os.environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = f"the file RAY_AUTH_TOKEN_PATH names ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    else:
        source = "~/.ray/auth_token on this machine"
    return (
        f"--address {address!r}: the Ray cluster there refuses this driver's token, read from "
        f"{source} (the cluster answered: {answer}). Put the cluster's token there instead: "
        f"{where}"
    )


def check_resources(resources: Resources) -> None:
    """Refuse a grid whose per-cell resources no node of the cluster can satisfy."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for node in nodes:
        if node.get("CPU", 0) >= resources.cpu and node.get("GPU", 0) >= resources.gpu:
            return
    offered = "; ".join(f"CPU {n.get('CPU', 0):g}, GPU {n.get('GPU', 0):g}" for n in nodes)
    raise ConfigError(
        f"resources: a cell asks for cpu {resources.cpu:g}, gpu {resources.gpu:g}, but no node "
        f"of the cluster has that (nodes: {offered or 'none'}); lower resources or add a node"
    )


def device_for(gpu_ids: list, gpu_request: float, cuda_available: bool = True) -> str:
    """The device a cell trains on: the GPU Ray assigned it, or the CPU.

    A node can declare GPUs that this process cannot use (`ray start --num-gpus` on a
    machine without a driver, a CPU-only torch): the cell then trains on the CPU, and says
    so, rather than failing on its first CUDA call.
    """
    if gpu_request > 0 and gpu_ids:
        if cuda_available:
            return "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
        log.warning(
            "Ray assigned GPU %s to this cell on %s, but CUDA is not available there "
            "(torch.cuda.is_available() is False): training on the CPU",
            ",".join(map(str, gpu_ids)),
            socket.gethostname(),
        )
    return "cpu"


def threads_for(cpu_request: float) -> int:
    """Torch threads = CPUs Ray gave the cell; more oversubscribes a shared node."""
    return max(1, int(cpu_request))


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)
def _run_cell_task(fn: Callable[..., CellOutcome], cell: Cell, resources: Resources):
    import torch

    device = device_for(ray.get_gpu_ids(), resources.gpu, torch.cuda.is_available())
    return fn(cell, device=device, threads=threads_for(resources.cpu))


@ray.remote
def _warm_up() -> None:
    import torch

    from forgetless.experiments import runner  # noqa: F401 - torch, MLflow, the strategies

    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # the first imports torch._dynamo


def ray_executor(resources: Resources, cells: int, on_running: Callable[[int], None] | None = None):
    """An executor for `run_grid`: every cell as a Ray task, yielded as each one ends.

    Made before `run_grid` reads the store, it sets the workers that will take the first
    `cells` cells on their one-time costs at once: seconds of imports (torch, MLflow, and
    torch._dynamo, which torch imports for the first optimizer) that would otherwise
    delay each worker's first cell.
    """
    check_resources(resources)
    # Asking for what a cell asks puts each warm-up on a node that will run cells.
    warm_up = _warm_up.options(num_cpus=resources.cpu, num_gpus=resources.gpu)
    for _ in range(min(cells, _slots(resources))):
        warm_up.remote()

    def execute(cells: list[Cell], fn: Callable[..., CellOutcome]) -> Iterator[CellOutcome]:
        from forgetless.experiments.runner import CellOutcome

        task = _run_cell_task.options(num_cpus=resources.cpu, num_gpus=resources.gpu)
        pending = {task.remote(fn, cell, resources): cell for cell in cells}
        slots = _slots(resources)
        try:
            while pending:
                if on_running:
                    on_running(min(len(pending), slots))
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready)
                try:
                    yield ray.get(ready)
                except ray.exceptions.RayError as e:  # the worker died MAX_RETRIES + 1 times
                    reason = f"{type(e).__name__}: worker lost after {MAX_RETRIES} retries: {e}"
                    yield CellOutcome(
                        cell.hash, cell.label(), "FAILED", error=reason[:2000], recorded=False
                    )
        finally:  # Ctrl-C or a driver that stops reading: no cell goes on without it
            cancel(list(pending))

    return execute


def cancel(refs: list, patience_s: float = 10.0) -> None:
    """Force-cancel tasks until each has ended. On a loaded machine a cancel can be lost
    (a task started seconds after it, seen in tests/test_cluster.py), so it is repeated
    for what has not ended, at most `patience_s` seconds."""
    deadline = time.monotonic() + patience_s
    while refs and time.monotonic() < deadline:
        for ref in refs:
            ray.cancel(ref, force=True)
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=1.0)


def _slots(resources: Resources) -> int:
    """How many cells the cluster runs at once (for the progress display)."""
    total = ray.cluster_resources()
    by_cpu = total.get("CPU", 0) // resources.cpu
    by_gpu = total.get("GPU", 0) // resources.gpu if resources.gpu else by_cpu
    return max(1, int(min(by_cpu, by_gpu)))
