"""Where cells keep what outlives them: pre-trained bases, encoded memories."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FORGETLESS_CACHE, default ~/.cache/forgetless."""
    return Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless"))
