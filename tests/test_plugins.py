"""Strategy plugins: an installed package's entry point, and a module:Class name in the grid."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from forgetless.experiments.runner import run_grid
from forgetless.strategies import STRATEGIES, strategy_class

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "der_plugin"


@pytest.fixture(scope="module")
def installed_der(tmp_path_factory):
    """pip-install the README's example plugin into a folder put on sys.path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(EXAMPLE)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("forgetless_der", None)


def test_entry_point_plugin_is_listed_and_runs_in_a_grid(installed_der, write_grid, tracking_uri):
    assert "der" in STRATEGIES.names()
    cls = strategy_class("der", "strategies[0]")
    assert cls.__module__ == "forgetless_der"
    grid = write_grid(strategies=[{"name": "der", "alpha": 0.3, "buffer": {"size": 30}}])
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.summary["memory_bytes"] > 0


def test_module_colon_class_name_loads_the_plugin(installed_der, write_grid, tracking_uri):
    grid = write_grid(strategies=[{"name": "forgetless_der:DER", "buffer": {"bytes": 20000}}])
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.summary["memory_bytes"] <= 20000


def test_readme_shows_the_tested_plugin_verbatim():
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    assert (EXAMPLE / "forgetless_der.py").read_text().strip() in readme
