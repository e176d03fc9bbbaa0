"""A sweep's runs, read back from MLflow (`Tracker.read_sweep`), as pandas tables with the Pareto frontiers:
`points` (one row per ordering and stage), `models` (one row per distinct model, a shared prefix being one),
`orderings` (each ordering's final model, best first)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from pipeline.pareto import Direction, frontiers
from pipeline.reporting.columns import (
    METRIC_COLUMNS,
    REPORT_RUNTIMES,
    RUNTIMES,
    latency_column,
    report_objectives,
    top1_column,
)
from pipeline.tracking import TAGS, RunRecord, SweepRuns


@dataclass
class SweepReport:
    """A sweep's runs as tables. `points`: one row per (ordering, stage); `models`: one row per distinct
    model (cache key) with its frontier flags; `orderings`: each ordering's final model, best first."""

    sweep_id: str
    sweep: dict[str, object]
    points: pd.DataFrame
    models: pd.DataFrame
    orderings: pd.DataFrame
    runtime: str = "torch"

    @property
    def objectives(self) -> dict[str, Direction]:
        return report_objectives(self.runtime)


def default_runtime(runs: SweepRuns) -> str:
    """The sweep's first deploy runtime whose metrics were logged, else 'torch'."""
    tagged = [run.tags[TAGS.deploy_runtimes] for run in runs.stages if run.tags.get(TAGS.deploy_runtimes)]
    for runtime in tagged[0].split(",") if tagged else []:
        if runtime in RUNTIMES and any(latency_column(runtime) in run.metrics for run in runs.stages):
            return runtime
    return "torch"


def build_report(
    runs: SweepRuns, sweep_id: str, latency: dict[str, float] | None = None, runtime: str | None = None
) -> SweepReport:
    """Tables from a sweep's runs as `Tracker.read_sweep` returns them.

    `runtime`: whose top-1 and latency the frontiers use (default: `default_runtime`); `latency` (cache key -> ms)
    replaces that runtime's latency logged by each stage, e.g. with a side-by-side re-measurement."""
    runtime = runtime or default_runtime(runs)
    if runtime not in REPORT_RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(REPORT_RUNTIMES)}")
    _refuse_several_seeds(runs.chains, sweep_id)
    chains = _latest_finished_chains(runs.chains)
    if not chains:
        raise ValueError(f"sweep {sweep_id!r} has no finished ordering yet; run `make sweep` first")
    stages = [run for run in runs.stages if run.parent_id in chains]
    points = _points(stages, chains)
    if runtime != "torch" and points[latency_column(runtime)].isna().all():
        raise ValueError(f"sweep {sweep_id!r} logged no {runtime} metrics (its recipe's deploy.runtimes)")
    if latency is not None:
        points[latency_column(runtime)] = points["cache_key"].map(latency)
    models = _models(points, runtime)
    orderings = _orderings(points, models, runtime)
    meta = _sweep_facts(runs, chains, stages)
    meta["latency_source"] = "side by side" if latency is not None else "per stage"
    meta["runtime"] = runtime
    return SweepReport(sweep_id, meta, points, models, orderings, runtime)


class SeveralSeedsNotSupported(ValueError):
    """A sweep that repeats orderings over seeds: its report would have to aggregate them."""


def _refuse_several_seeds(chains: list[RunRecord], sweep_id: str) -> None:
    """Reports over several seeds (mean ± CI, paired tests) are not built yet; picking one seed's chain per
    ordering would silently report a single repetition as the ordering's result."""
    seeds: dict[str, set[str]] = {}
    for run in chains:
        if run.status == "FINISHED":
            seeds.setdefault(run.tags[TAGS.ordering], set()).add(run.tags.get(TAGS.seed, ""))
    repeated = sorted(o for o, s in seeds.items() if len(s) > 1)
    if repeated:
        raise SeveralSeedsNotSupported(
            f"sweep {sweep_id!r} ran {', '.join(repeated[:3])} with several seeds: reports across seeds (mean ± CI, "
            "paired tests) are not yet supported (issue #14); each (ordering, seed) chain is in MLflow with a `seed` "
            "tag, and its per-image predictions are logged with every stage run"
        )


def _latest_finished_chains(chains: list[RunRecord]) -> dict[str, str]:
    """run id -> ordering of each ordering's latest FINISHED chain run (an ordering rerun: its latest run)."""
    latest: dict[str, RunRecord] = {}
    for run in sorted(chains, key=lambda r: r.start_time):
        if run.status == "FINISHED":
            latest[run.tags[TAGS.ordering]] = run
    return {run.run_id: ordering for ordering, run in latest.items()}


def _sweep_facts(runs: SweepRuns, chains: dict[str, str], stages: list[RunRecord]) -> dict[str, object]:
    """The sweep run's params and metrics, its id and recipe, the orderings that failed, the CPU it ran on."""
    sweep = max(runs.sweeps, key=lambda r: r.start_time, default=None)
    meta: dict[str, object] = {**sweep.params, **sweep.metrics} if sweep else {}
    meta["sweep"] = sweep.tags.get(TAGS.sweep) if sweep else None
    meta["run_id"] = sweep.run_id if sweep else None
    meta["recipe"] = sweep.tags.get(TAGS.recipe) if sweep else None
    finished = set(chains.values())
    failed = {run.tags[TAGS.ordering] for run in runs.chains if run.status == "FAILED"}
    meta["failed_orderings"] = sorted(failed - finished)
    cpu = [run.tags[TAGS.cpu_capability] for run in stages if run.tags.get(TAGS.cpu_capability)]
    meta["cpu_capability"] = cpu[0] if cpu else None
    return meta


def _points(stages: list[RunRecord], chains: dict[str, str]) -> pd.DataFrame:
    """One row per stage run of the finished orderings; a metric a stage did not log (e.g. an older run) is NaN,
    shown as "–". The ordering is its chain's (older stage runs carried it too; newer ones do not)."""
    rows = [
        {
            "run_id": run.run_id,
            "ordering": chains[run.parent_id],
            "stage": run.tags[TAGS.stage],
            "stage_index": int(run.tags[TAGS.stage_index]),
            "cache_key": run.tags[TAGS.cache_key],
            "cached": run.flag(TAGS.cached),
            **{metric: run.metrics.get(metric, float("nan")) for metric in METRIC_COLUMNS},
        }
        for run in stages
    ]
    return pd.DataFrame(rows).sort_values(["ordering", "stage_index"]).reset_index(drop=True)


def _models(points: pd.DataFrame, runtime: str) -> pd.DataFrame:
    """Distinct models (a shared prefix is one model), labelled by the shortest ordering prefix reaching them,
    with their frontier flags in `runtime` (`pareto`, `pareto_<a>__<b>`) and the 3-D flag in every runtime
    that was measured (`pareto[<runtime>]`)."""
    points = points.assign(
        path=[">".join(_path(o, i)) for o, i in zip(points.ordering, points.stage_index, strict=True)]
    )
    models = points.sort_values("stage_index").drop_duplicates("cache_key").set_index("cache_key")
    models = models[["path", "stage", "stage_index", *[c for c in METRIC_COLUMNS if c in models]]]
    objectives = report_objectives(runtime)
    flags = frontiers(models.dropna(subset=list(objectives)), objectives)
    for other in REPORT_RUNTIMES:
        measured = models.dropna(subset=list(report_objectives(other)))
        if not measured.empty:
            flags[f"pareto[{other}]"] = frontiers(measured, report_objectives(other))["pareto"]
    return models.join(flags).fillna({c: False for c in flags.columns}).astype({c: bool for c in flags.columns})


def _path(ordering: str, index: int) -> list[str]:
    return ["baseline", *ordering.split(">")[:index]] if index else ["baseline"]


def _orderings(points: pd.DataFrame, models: pd.DataFrame, runtime: str) -> pd.DataFrame:
    """Each ordering's final model: top-1 and latency in `runtime` (columns named by it), torch eager's beside."""
    baseline = points[points.stage_index == 0].iloc[0]
    finals = points.sort_values("stage_index").groupby("ordering").tail(1).set_index("ordering")
    top1, latency = top1_column(runtime), latency_column(runtime)
    out = pd.DataFrame(index=finals.index)
    out["stages"] = finals["stage_index"]
    out[top1] = finals[top1]
    out["delta_top1"] = finals[top1] - baseline[top1]
    out["artifact_bytes"] = finals["artifact_bytes"]
    out["size_ratio"] = finals["artifact_bytes"] / baseline["artifact_bytes"]
    out[latency] = finals[latency]
    out["speedup"] = baseline[latency] / finals[latency]
    if runtime != "torch":
        out["torch_latency_ms_p50"] = finals["latency_ms_p50"]
        out["torch_speedup"] = baseline["latency_ms_p50"] / finals["latency_ms_p50"]
        out[f"{runtime}.file_bytes"] = finals[f"{runtime}.file_bytes"]
    out["pareto"] = models.loc[finals["cache_key"], "pareto"].to_numpy()
    trained = points.groupby("ordering")["cached"].agg(lambda c: int((~c).sum()))
    out["stages_trained"] = trained.reindex(out.index)
    out = out.sort_values(["pareto", top1], ascending=[False, False])
    return out.reset_index()
