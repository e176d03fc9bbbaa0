"""Benchmark scripts that nothing else runs on the suite's machines: their cheap modes, so they keep working as the
code under them moves (`bench/gpu_check.py` once broke unseen when recipes began to extend each other)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stages import available_stages
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_runs_every_stage_and_the_default_chain_without_a_gpu_or_the_data(tmp_path):
    """`--device cpu --quick` is the script's own self-check: a GPU box has no dataset and may lack the deploy
    runtimes, so the chain check must not need them (DATA_DIR points nowhere)."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DATA_DIR": str(tmp_path / "no-data"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for size in ("small", "224px"):
        rows = figures["stages"][size]["rows"]
        assert [r["stage"] for r in rows] == ["train", *[n for n in available_stages() if n != "train"]]
        assert all(r["images_per_s"] > 0 and r["epochs"] >= 1 for r in rows)
    assert list(figures["chain"]["cpu"]) == ["train", "prune", "inq", "distill"]  # recipes/prune-inq-distill.yaml
