"""Where the checkout's own folders are: recipes/, reports/, .cache/ and mlflow.db are found relative to its root."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else .cache/ in the project folder."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or PROJECT_ROOT / ".cache")
