"""Which metric columns a report reads, per runtime: 'torch' is the artifact in PyTorch eager, the others the
exported file in that runtime (metrics named `<runtime>.<metric>`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.deploy import runtime_names

if TYPE_CHECKING:
    from pipeline.analysis.pareto import Direction

RUNTIME_METRICS = ("val_top1", "top1", "latency_ms_p50", "file_bytes")
MODEL_COLUMNS = ("val_top1", "top1", "artifact_bytes", "latency_ms_p50", "param_count", "macs", "stage_seconds")


def report_runtimes() -> tuple[str, ...]:
    """Where a report can read accuracy and latency: 'torch' (the artifact in PyTorch eager), then every registered
    deployment runtime."""
    return ("torch", *runtime_names())


def metric_columns() -> tuple[str, ...]:
    """The metric columns a report reads: the model's, then each registered runtime's."""
    return (*MODEL_COLUMNS, *(f"{r}.{m}" for r in runtime_names() for m in RUNTIME_METRICS))


def top1_column(runtime: str, split: str) -> str:
    """The metric holding top-1 on `split` ('val': what a report chooses on; 'test': what it reports) as measured
    in `runtime` ('torch': the artifact in PyTorch)."""
    from pipeline.core.metrics import split_metric

    return split_metric("top1" if runtime == "torch" else f"{runtime}.top1", split)


def latency_column(runtime: str) -> str:
    """The metric holding batch-1 p50 latency in `runtime`."""
    return "latency_ms_p50" if runtime == "torch" else f"{runtime}.latency_ms_p50"


def report_objectives(runtime: str, split: str) -> dict[str, Direction]:
    """The report's frontier objectives in `runtime`: accuracy on `split` up, artifact size and batch-1 latency down."""
    return {top1_column(runtime, split): "max", "artifact_bytes": "min", latency_column(runtime): "min"}


def runtime_name(runtime: str) -> str:
    """How a report names a runtime."""
    return "torch eager" if runtime == "torch" else runtime
