"""Which metric columns a report reads, per runtime: 'torch' is the artifact in PyTorch eager, the others the
exported file in that runtime (metrics named `<runtime>.<metric>`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.pareto import Direction

RUNTIMES = ("onnxruntime", "openvino")
REPORT_RUNTIMES = ("torch", *RUNTIMES)  # torch = the artifact in PyTorch eager
RUNTIME_METRICS = ("top1", "latency_ms_p50", "file_bytes")
METRIC_COLUMNS = (
    "top1", "artifact_bytes", "latency_ms_p50", "param_count", "macs", "stage_seconds",
    *(f"{r}.{m}" for r in RUNTIMES for m in RUNTIME_METRICS),
)  # fmt: skip


def top1_column(runtime: str) -> str:
    """The metric holding top-1 as measured in `runtime` ('torch': the artifact in PyTorch)."""
    return "top1" if runtime == "torch" else f"{runtime}.top1"


def latency_column(runtime: str) -> str:
    """The metric holding batch-1 p50 latency in `runtime`."""
    return "latency_ms_p50" if runtime == "torch" else f"{runtime}.latency_ms_p50"


def report_objectives(runtime: str) -> dict[str, Direction]:
    """The report's frontier objectives in `runtime`: accuracy up, artifact size and batch-1 latency down."""
    return {top1_column(runtime): "max", "artifact_bytes": "min", latency_column(runtime): "min"}


def runtime_name(runtime: str) -> str:
    """How a report names a runtime."""
    return "torch eager" if runtime == "torch" else runtime
