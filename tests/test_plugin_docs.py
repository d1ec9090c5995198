"""docs/plugins.md's worked example is real code: taken from the page, it runs in a grid."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from forgetless.core.schema import ConfigError
from forgetless.experiments.runner import run_grid

PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
MODULE = "forgetless_docs_er_ace"


def example_code() -> str:
    """The page's one ```python block that defines a Strategy subclass."""
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)
    strategies = [block for block in blocks if "(Strategy):" in block]
    assert len(strategies) == 1, f"expected one strategy in {PAGE}, found {len(strategies)}"
    return strategies[0]


@pytest.fixture
def example_module(tmp_path, monkeypatch) -> str:
    """The example written to a module of its own, importable as `MODULE`."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(example_code())
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()
    yield MODULE
    sys.modules.pop(MODULE, None)


def test_plugins_page_example_finishes_a_grid_cell_as_module_colon_class(
    example_module, write_grid, tracking_uri
):
    name = f"{example_module}:ERACE"
    grid = write_grid(strategies=[{"name": name, "buffer": {"size": 50}, "replay_batch_size": 16}])
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    assert outcome.summary["memory_bytes"] > 0


def test_plugins_page_example_refuses_a_bad_parameter_before_running(example_module, write_grid):
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.replay_batch_size: must be at least"):
        write_grid(strategies=[{"name": f"{example_module}:ERACE", "replay_batch_size": 0}])
