"""The toy sweep the report tests read: written straight through the Tracker with known metrics (test_report.py)."""

from __future__ import annotations

import pytest

from pipeline.tracking import Tracker


@pytest.fixture
def toy_store(tmp_path):
    """(tracker, sweep run id) of a store holding `test_report.write_toy_sweep`'s sweep."""
    from tests.pipeline.reporting.test_report import write_toy_sweep

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracker, write_toy_sweep(tracker)
