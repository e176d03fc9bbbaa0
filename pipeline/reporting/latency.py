"""Batch-1 latency of a sweep's distinct models measured again, side by side in one process (interleaved
rounds), from the artifacts and exported files stored with their MLflow stage runs: fair ratios on a busy machine,
where each stage's own figure carries the noise of the moment it ran."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.reporting.columns import runtime_name
from pipeline.tracking import TAGS, RunRecord, RunType, records_from_frame

log = logging.getLogger("pipeline")

REMEASURE_ROUNDS, REMEASURE_CALLS = 7, 100


def remeasure_latency(
    tracker,
    stages: list[RunRecord] | pd.DataFrame,
    runtime: str = "torch",
    rounds: int = REMEASURE_ROUNDS,
    calls: int = REMEASURE_CALLS,
) -> dict[str, float]:
    """Batch-1 p50 (ms, 1 thread) of every distinct model of a sweep in `runtime`, its artifact (torch) or exported
    file fetched from its stage run in MLflow and timed side by side with the others (interleaved rounds), so
    ratios are fair on a busy machine. `stages`: the sweep's stage runs (a `Tracker.runs_frame` works too);
    returns cache key -> ms."""
    import tempfile

    from pipeline import load_artifact
    from pipeline.core.metrics import latency_side_by_side
    from pipeline.deploy import get_runtime, open_runtime
    from pipeline.deploy.measure import predict_side_by_side

    if isinstance(stages, pd.DataFrame):
        stages = records_from_frame(stages)
    models = _distinct_finished_models(stages)
    log.info("re-measuring batch-1 latency of %d models in %s side by side (%d rounds x %d calls)",
             len(models), runtime_name(runtime), rounds, calls)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if runtime == "torch":
            loaded = [load_artifact(tracker.download_artifact(run.run_id, "model/artifact.pt", Path(tmp) / str(i)))
                      for i, run in enumerate(models.values())]  # fmt: skip
            sizes = [tuple(m.pretrained_cfg["input_size"]) for m in loaded]
            medians = latency_side_by_side(loaded, sizes, threads=1, rounds=rounds, runs=calls)
        else:
            top, *rest = Path(get_runtime(runtime).file).parts  # its file, or the folder holding its files
            predicts = []
            for i, run in enumerate(models.values()):
                local = tracker.download_artifact(run.run_id, f"deploy/{top}", Path(tmp) / str(i))
                file = Path(local).joinpath(*rest)
                predicts.append(open_runtime(runtime, file, threads=1, batch_size=1))
            medians = predict_side_by_side(predicts, _input_size(models.values()), rounds=rounds, runs=calls)
    return dict(zip(models, medians, strict=True))


def _distinct_finished_models(stages: list[RunRecord]) -> dict[str, RunRecord]:
    """cache key -> one FINISHED stage run that holds that model."""
    models: dict[str, RunRecord] = {}
    for run in stages:
        if run.tags.get(TAGS.run_type) == RunType.STAGE and run.status == "FINISHED":
            models.setdefault(run.tags[TAGS.cache_key], run)
    return models


def _input_size(stages) -> tuple[int, ...]:
    """The sweep's model input size (C, H, W), from the first stage's logged artifact metadata."""
    sizes = [run.tags[TAGS.input_size] for run in stages if run.tags.get(TAGS.input_size)]
    if not sizes:
        raise ValueError("the sweep's runs carry no input_size tag (logged by newer versions): rerun the sweep")
    return tuple(int(v) for v in sizes[0].split("x"))
