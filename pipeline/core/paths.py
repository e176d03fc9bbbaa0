"""Where the checkout's own folders are: recipes/, reports/, .cache/ and mlflow.db are found relative to its root."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
