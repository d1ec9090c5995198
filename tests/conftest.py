"""Shared fixtures: one MLflow store per test session, tiny grids written to tmp folders."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from forgetless.experiments.config import Grid, load_grid

_names = itertools.count()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A SQLite store shared by the session; each test uses its own grid name (experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def write_grid(tmp_path: Path):
    """write_grid(**fields) -> Grid: a tiny split_digits grid, overridable field by field."""

    def write(**fields) -> Grid:
        data = {
            "name": f"test-{next(_names)}",
            "seeds": [0],
            "streams": [
                {
                    "name": "split_digits",
                    "n_experiences": 2,
                    "fixed_class_order": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                }
            ],  # fmt: skip
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "strategies": ["naive"],
            "storage": str(tmp_path / "runs"),
        }
        data.update(fields)
        path = tmp_path / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_grid(path)

    return write
