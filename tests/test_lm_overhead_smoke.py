"""benchmarks/lm_overhead.py --smoke runs as a user runs it and ends in one JSON line: the
forgetless loop and the bare transformers loop do the same work (equal final weights),
and bf16 training on the CPU stays finite. Smoke figures measure nothing: no target is
asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lm_overhead_smoke_prints_its_figures_as_json():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lm_overhead.py"), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("step_vs_bare", "bf16_loss_gap", "forgetless_step_s", "bare_step_s"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["max_weight_diff"] < 1e-6  # the two loops took the same steps
    assert result["precision"]["bf16"]["finite"] and result["precision"]["fp32"]["finite"]
    assert result["config"]["smoke"] is True
    assert isinstance(result["step_vs_bare_target_met"], bool)
