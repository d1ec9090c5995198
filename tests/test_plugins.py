"""Strategy plugins: an installed package's entry point, a module:Class name in the grid, and
one entry-point name claimed by two packages (refused)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from forgetless.core.schema import ConfigError
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


@pytest.mark.integration  # pip-installs the example plugin
def test_entry_point_plugin_is_listed_and_runs_in_a_grid(installed_der, write_grid, tracking_uri):
    assert "der" in STRATEGIES.names()
    cls = strategy_class("der", "strategies[0]")
    assert cls.__module__ == "forgetless_der"
    grid = write_grid(strategies=[{"name": "der", "alpha": 0.3, "buffer": {"size": 30}}])
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.summary["memory_bytes"] > 0


@pytest.mark.integration  # pip-installs the example plugin
def test_module_colon_class_name_loads_the_plugin(installed_der, write_grid, tracking_uri):
    grid = write_grid(strategies=[{"name": "forgetless_der:DER", "buffer": {"bytes": 20000}}])
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.summary["memory_bytes"] <= 20000


def test_readme_shows_the_tested_plugin_verbatim():
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    assert (EXAMPLE / "forgetless_der.py").read_text().strip() in readme


def write_distribution(site: Path, name: str, entry_points: str) -> None:
    """A minimal installed distribution: a dist-info folder with METADATA and entry points."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_two_distributions_claiming_one_strategy_name_are_refused(tmp_path, monkeypatch):
    for dist, module in (("twin-one", "twin_one"), ("twin-two", "twin_two")):
        write_distribution(tmp_path, dist, f"[forgetless.strategies]\ntwin = {module}:Twin\n")
    write_distribution(
        tmp_path,
        "alias-one",
        "[forgetless.strategies]\nplain = forgetless.strategies.naive:Naive\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()

    with pytest.raises(ConfigError) as refused:
        strategy_class("twin", "strategies[0]")
    assert str(refused.value).startswith("strategies[0]: strategy 'twin' is the "
                                         "forgetless.strategies entry point of 2 installed "
                                         "distributions: twin-one, twin-two;")  # fmt: skip
    with pytest.raises(ConfigError, match=r"'twin' .* twin-one, twin-two"):
        STRATEGIES.names()  # what `forgetless strategies` lists
    # A name one distribution alone claims still loads: only the shared name is refused.
    assert strategy_class("plain", "strategies[1]").__name__ == "Naive"
