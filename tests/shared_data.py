"""../shared/data: small real samples of ZsRE, CounterFact, SuperNI and TRACE, which CI puts
beside the clone. A test that reads them skips where the folder is missing, except under CI
(CI=true), where a missing folder must fail, not pass unseen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir() and not os.environ.get("CI"),
    reason=f"the real format samples are not at {SHARED_DATA}: put ../shared beside the clone",
)
