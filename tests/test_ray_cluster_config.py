"""ray_cluster.yaml is a real autoscaler config: it passes the schema shipped with ray."""

from __future__ import annotations

import copy
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
