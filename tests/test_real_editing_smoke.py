"""benchmarks/real_editing.py --smoke: the real-model editing benchmark's code path (FT-L,
GRACE and WISE through the runner on the ZsRE records of ../shared/data) on a tiny random
Llama and 2 edits, as a user runs it, ending in its one JSON line. The figures of a smoke
run measure nothing: only their shape and range are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"reliability", "generalization", "locality", "reliability_exact",
        "generalization_exact", "locality_exact", "seconds_per_edit", "cells"}  # fmt: skip


def test_real_editing_smoke_prints_every_method_s_scores_for_t1_and_t2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORGETLESS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "benchmarks/real_editing.py", "--smoke"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["smoke"] is True and set(result) == {"T1", "T2", "model", "settings", "smoke"}
    assert result["settings"] == []  # no --set: every method ran with the benchmark's defaults
    for t, cells in (("T1", 2), ("T2", 1)):
        assert set(result[t]) == {"ft_l", "grace", "wise"}
        for method, scores in result[t].items():
            assert set(scores) == KEYS, (t, method, scores)
            assert scores["cells"] == cells and scores["seconds_per_edit"] > 0
            assert all(0 <= scores[k] <= 1 for k in KEYS - {"cells", "seconds_per_edit"})
