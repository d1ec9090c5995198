"""benchmarks/baselines.py runs end to end with --smoke and prints its result as JSON.

As tests/test_benchmarks.py does for the other scripts: the script runs as a user runs it,
in a subprocess from the repository root, and its last stdout line is read. The figures
of a smoke run measure nothing, so no target is asserted. It reads the real MNIST: under
CI (which installs it) a missing copy fails, elsewhere it skips.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["si_split_mnist_task", "gdumb_split_mnist_class", "naive_split_mnist_class",
        "cumulative_split_mnist_class", "rehearsal_split_mnist_class", "ewc_permuted_mnist",
        "si_permuted_mnist", "agem_permuted_mnist"]  # fmt: skip
TARGETS = {
    "si_split_mnist_task": 0.97,
    "gdumb_split_mnist_class": 0.97,
    "ewc_permuted_mnist": 0.83,
    "si_permuted_mnist": 0.83,
    "agem_permuted_mnist": 0.81,
}


def _no_constant(name: str):
    raise AssertionError(f"the result holds {name}, which is not JSON; write null instead")


def test_baselines_smoke(tmp_path):
    from forgetless.core.schema import ConfigError
    from forgetless.streams.mnist import check_available

    try:
        check_available("mnist", None, "mnist")
    except ConfigError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and MNIST is not installed: {e}")
        pytest.skip(str(e))
    env = {**os.environ, "FORGETLESS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "benchmarks/baselines.py", "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1], parse_constant=_no_constant)
    assert set(result) == {"rows", "rehearsal_vs_avalanche_replay_speedup", "smoke"}
    assert result["smoke"] is True
    assert [r["name"] for r in result["rows"]] == ROWS
    for row in result["rows"]:
        assert {"name", "target", "mean", "std", "seconds", "avalanche_seconds"} <= set(row)
        assert row["target"] == TARGETS.get(row["name"])
        assert 0 <= row["mean"] <= 1 and 0 <= row["avalanche_acc"] <= 1 and row["std"] == 0
        assert row["seconds"] > 0 and row["avalanche_seconds"] > 0
    speedup = result["rehearsal_vs_avalanche_replay_speedup"]
    assert isinstance(speedup, float) and math.isfinite(speedup) and speedup > 0
