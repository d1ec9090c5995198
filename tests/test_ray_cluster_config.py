"""ray_cluster.yaml is a real autoscaler config: it passes the schema shipped with ray, keeps
cells off the head, uploads code only, and exposes neither Ray nor MLflow without a token or
outside the cluster."""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_config_passes_rays_schema():
    config = load()
    validate_config(prepare_config(copy.deepcopy(config)))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert any("mlflow server" in c for c in config["head_setup_commands"])
    assert any("pip install" in c for c in config["setup_commands"])


def test_schema_check_is_real_a_misspelt_key_fails():
    config = load()
    config["available_node_types"]["gpu_worker"]["min_wrkers"] = 1
    with pytest.raises(ValidationError, match="min_wrkers"):
        validate_config(prepare_config(config))


def test_head_offers_no_cpu_so_cells_stay_on_the_workers(monkeypatch):
    """The autoscaler hands a node type's `resources` to `ray start` as RAY_OVERRIDE_RESOURCES;
    this is what Ray makes of the head's."""
    from ray._private.ray_constants import RESOURCES_ENVIRONMENT_VARIABLE
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    config = load()
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    assert head == {"CPU": 0}
    prepared = prepare_config(copy.deepcopy(config))
    assert prepared["available_node_types"]["head"]["resources"] == head
    monkeypatch.setenv(RESOURCES_ENVIRONMENT_VARIABLE, json.dumps(head))
    spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1")
    assert spec.num_cpus == 0


def excluded(path: str, args: list[str]) -> bool:
    """Whether rsync leaves `path` out under these `--exclude` arguments: a pattern without a
    slash matches the name of any directory or file on the way down."""
    patterns = [args[i + 1] for i, a in enumerate(args) if a == "--exclude"]
    return any(fnmatch.fnmatch(part, p) for part in path.split("/") for p in patterns)


def test_uploads_leave_out_the_venv_stores_and_checkpoints():
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    config = load()
    assert config["file_mounts"]["/home/ubuntu/forgetless"] == "."
    # The arguments `ray up` gives rsync for every file mount (to the head, then the workers).
    args = SSHCommandRunner._create_rsync_filter_args(None, config)
    heavy = [".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", "mlflow.db",
             "mlartifacts/1/abc/artifacts/accuracy_matrix.png", "mlruns/0/meta.yaml",
             "forgetless_runs/quickstart/0a1b/checkpoint.pt", "experiments/__pycache__/x.pyc",
             ".git/objects/pack/p.pack", "forgetless.egg-info/PKG-INFO"]  # fmt: skip
    code = ["experiments/cluster.py", "pyproject.toml", "grids/quickstart.yaml", "README.md"]
    assert [p for p in heavy if not excluded(p, args)] == []
    assert [p for p in code if excluded(p, args)] == []
    # And whatever else .gitignore names (rsync reads it in every folder it copies).
    assert args[-2:] == ["--filter", "dir-merge,- .gitignore"]


def test_mlflow_server_listens_on_the_private_address_only():
    config = load()
    (server,) = [c for c in config["head_setup_commands"] if "mlflow server" in c]
    private = "$(hostname -I | awk '{print $1}')"  # the head's address inside its network
    assert f"--host {private} --port 5000" in server and "0.0.0.0" not in server
    (uri,) = [c for c in config["head_setup_commands"] if "MLFLOW_TRACKING_URI" in c]
    assert f"http://{private}:5000" in uri  # the cells are given the address it listens on


def test_every_node_requires_the_token_that_file_mounts_copy():
    config = load()
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert start.startswith("RAY_AUTH_MODE=token ray start")
