"""A sweep's Pareto-frontier report (`report_sweep`), the one entry point to it.

It reads the sweep's runs back from MLflow (`Tracker.read_sweep`) into pandas and writes `reports/<sweep>/`:
report.md and orderings.csv / models.csv (every ordering's final metrics, best first, with deltas vs the baseline;
every distinct model with its frontier flags), one PNG and SVG per plot, report.html (the same page, plots as inline
SVG) and report-interactive.html (plotly). The same folder is logged as artifacts of the sweep's MLflow run,
whose Description becomes the verdict table (`publish`). The jobs it is made of are the other modules of
`pipeline.reporting` (sweep tables, plots, pages, the verdict, the latency re-measure).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core.metrics import load_predictions
from pipeline.core.paths import PROJECT_ROOT
from pipeline.reporting.latency import REMEASURE_CALLS, REMEASURE_ROUNDS, remeasure_latency
from pipeline.reporting.pages import write_report
from pipeline.reporting.sweep_tables import SweepReport, build_report, default_runtime
from pipeline.reporting.verdict import Links, headline, sweep_note
from pipeline.tracking import TAGS

log = logging.getLogger("pipeline")

REPORTS_DIR = PROJECT_ROOT / "reports"


def stored_correctness(tracker, tmp: Path) -> Callable[[str, str, str], np.ndarray | None]:
    """`(stage_run_id, runtime, split) -> per-image correctness` from the predictions the stage run logged (None when
    it logged none, e.g. a run from before predictions were stored, or none for that runtime or split)."""

    def correct_of(run_id: str, runtime: str, split: str = "val") -> np.ndarray | None:
        try:
            folder = tracker.download_artifact(run_id, "predictions", tmp / run_id)
        except Exception:  # MLflow raises several types for a missing artifact; none is worth more than a note
            return None
        files = sorted(Path(folder).glob("*.npz"))
        stored = load_predictions(files[0], split) if files else {}
        return stored[runtime] == stored["labels"] if runtime in stored else None

    return correct_of


def report_sweep(
    tracker,
    sweep_id: str | None = None,
    out_root: Path = REPORTS_DIR,
    remeasure: bool = False,
    runtime: str | None = None,
) -> tuple[SweepReport, Path]:
    """Read a sweep (the latest when `sweep_id` is None) from MLflow, write its report, log it to the sweep run.

    `runtime`: whose accuracy and latency the frontiers use (default: the sweep's first deploy runtime);
    `remeasure` times every distinct model again side by side in it instead of using each stage's figure."""
    if sweep_id is None:
        latest = tracker.sweep_runs()
        if not latest:
            raise ValueError("no sweep in the MLflow store yet; run `make sweep recipe=NAME` first")
        sweep_id = latest[0].tags[TAGS.sweep]
    runs = tracker.read_sweep(sweep_id)
    if runs.empty:
        raise ValueError(f"no runs with tags.sweep = {sweep_id!r} in {tracker.uri}")
    runtime = runtime or default_runtime(runs)
    latency = remeasure_latency(tracker, runs.stages, runtime) if remeasure else None
    with tempfile.TemporaryDirectory() as tmp:
        report = build_report(runs, sweep_id, latency, runtime, stored_correctness(tracker, Path(tmp)))
    if remeasure:
        report.sweep["latency_how"] = f"median of {REMEASURE_ROUNDS} interleaved rounds x {REMEASURE_CALLS} calls"
    out_dir = Path(out_root) / sweep_id
    write_report(report, out_dir)
    if report.sweep.get("run_id"):
        publish(tracker, report, out_dir)
    log.info("report written to %s", out_dir)
    return report, out_dir


def publish(tracker, report: SweepReport, out_dir: Path) -> None:
    """The report on the sweep's MLflow run: its files under `report/`, the verdict table as the run's Description
    (each ordering linked to its run, the report one click away), the orderings as an MLflow table and the best
    ordering's figures as the run's metrics."""
    run_id = str(report.sweep["run_id"])
    tracker.log_artifacts(run_id, out_dir, "report")
    chains = report.points.sort_values("seed").drop_duplicates(["ordering", "seed"])
    runs = {name: list(group.chain_run_id) for name, group in chains.groupby("ordering", sort=False)}
    tracker.set_note(run_id, sweep_note(report, Links(tracker.run_link, tracker.artifact_link, runs)))
    tracker.log_table(run_id, report.orderings, "orderings.json")
    tracker.log_metrics(run_id, headline(report))


def sweep_models(tracker, sweep_id: str, metrics: list[str]):
    """Every distinct model a sweep measured (each stage's output, intermediate ones and the baseline included: the
    sweep's own frontier is drawn over them), one row per cache key, labelled by its path ('baseline>prune>qat'),
    with the given metric columns under the pipeline's names."""
    import pandas as pd

    from pipeline.tracking import MLFLOW_METRIC_NAMES

    runs = tracker.read_sweep(sweep_id)
    stages = [r for r in runs.stages if r.status == "FINISHED" and TAGS.cache_key in r.tags]
    if not stages:
        raise ValueError(f"sweep {sweep_id!r} has no finished stage run in {tracker.uri}")
    pipeline_names = {new: old for old, new in MLFLOW_METRIC_NAMES.items()}
    rows: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    for run in stages:
        key = run.tags[TAGS.cache_key]
        if key in seen:
            continue
        seen.add(key)
        names = run.tags.get(TAGS.chain_ordering, "?").split(">")[: int(run.tags.get(TAGS.stage_index, 0))]
        label = ">".join(["baseline", *names]) + f" [{key[:6]}]"
        rows[label] = {pipeline_names.get(k, k): v for k, v in run.metrics.items()}
    return pd.DataFrame.from_dict(rows, orient="index").reindex(columns=list(dict.fromkeys(metrics)))
