"""A stage's model is timed against its input model's in every runtime, side by side; a stage that exists to make
the model cheaper to run and made it slower is warned about (and the speed-up is on the run as a metric)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pipeline.core.metrics import EvalConfig
from pipeline.deploy import export_files, get_runtime
from pipeline.run.speed import compare_with_input
from stages.distill import DistillConfig
from stages.prune import PruneConfig

INPUT = (3, 32, 32)
RUNTIMES = ["onnxruntime", "openvino"]
CFG = EvalConfig(throughput_batch_size=8, throughput_runs=2)


def _exported(model: nn.Module, folder) -> dict:
    return export_files(model.eval(), INPUT, folder, RUNTIMES, opset=18)


@pytest.fixture(scope="module")
def small_and_big(tmp_path_factory):
    """A small model, and one built to be far slower (wide convolutions at full resolution)."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    big = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 4))  # fmt: skip
    root = tmp_path_factory.mktemp("speed")
    _exported(small, root / "small")
    return root / "small", _exported(big, root / "big")


def test_a_compute_lowering_stage_that_got_slower_is_warned_about(small_and_big, caplog):
    small_dir, big_files = small_and_big
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = compare_with_input("prune", PruneConfig(), big_files, small_dir, INPUT, CFG, threads=1)
    assert set(out) == {f"{r}.{m}" for r in RUNTIMES for m in ("speedup_vs_input", "throughput_speedup_vs_input")}
    assert all(v < 0.5 for v in out.values())
    assert "prune made the model slower than its input where it ships: onnxruntime batch 1" in caplog.text
    assert "onnxruntime batch 8" in caplog.text


def test_faster_is_quiet_and_a_stage_that_lowers_no_compute_is_not_judged(small_and_big, tmp_path, caplog):
    small_dir, big_files = small_and_big
    small_files = {r: small_dir / get_runtime(r).file for r in RUNTIMES}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        faster = compare_with_input("prune", PruneConfig(), small_files, big_files["onnxruntime"].parent, INPUT, CFG,
                                    threads=1)  # fmt: skip
        compare_with_input("distill", DistillConfig(), big_files, small_dir, INPUT, CFG, threads=1)
    assert all(v > 2 for v in faster.values()) and "slower" not in caplog.text
    assert compare_with_input("prune", PruneConfig(), small_files, tmp_path / "nothing", INPUT, CFG, threads=1) == {}
