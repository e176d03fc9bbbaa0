"""Is a stage's model faster than the model it started from, where it ships? Both exported files timed side by side
in every runtime (`pipeline.deploy.measure.speed_vs_input`), and a warning when a stage that exists to make the
model cheaper to run made it slower: structured pruning to channel counts a runtime's kernels do not block well
(ONNX Runtime's and OpenVINO's CPU kernels work on blocks of 8 or 16 channels) was measured 1.36x slower in ONNX
Runtime on a pretrained tf_efficientnet_lite0, and nothing said so."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.metrics import EvalConfig
from pipeline.deploy import get_runtime
from pipeline.deploy.measure import speed_vs_input
from stages import get_stage

log = logging.getLogger("pipeline")

SLOWER = 1 / 1.05
"""A speed-up below this (more than 5 % slower, beyond the side-by-side measurement's noise) is a slowdown."""


def compare_with_input(
    stage: str, config, files: dict[str, Path], input_dir: Path, input_size: tuple[int, ...], cfg: EvalConfig,
    *, threads: int,
) -> dict[str, float]:  # fmt: skip
    """`<runtime>.speedup_vs_input` and `.throughput_speedup_vs_input` of every runtime whose file the input model
    has too (its deploy folder `input_dir`); warns when a stage that declares it lowers compute got slower."""
    out: dict[str, float] = {}
    for runtime, file in files.items():
        input_file = input_dir / get_runtime(runtime).file
        if input_file.is_file():
            out.update(speed_vs_input(runtime, file, input_file, input_size, cfg, threads=threads))
    kinds = get_stage(stage).can_lower(config)
    if kinds is not None and "compute" not in kinds:
        return out
    slower = {k: v for k, v in out.items() if v < SLOWER}
    if slower:
        log.warning(
            "%s made the model slower than its input where it ships: %s (both timed side by side, %d thread(s)); "
            "channel counts a runtime's kernels do not block well (multiples of 8 or 16) can cost more than they save",
            stage, ", ".join(f"{_where(k, cfg)} {1 / v:.2f}x slower" for k, v in slower.items()), threads,
        )  # fmt: skip
    return out


def _where(metric: str, cfg: EvalConfig) -> str:
    """'onnxruntime batch 1' for a speed-up metric's name."""
    runtime, _, name = metric.partition(".")
    return f"{runtime} batch {1 if name == 'speedup_vs_input' else cfg.throughput_batch_size}"
