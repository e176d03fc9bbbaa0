"""A sweep's runs, read back from MLflow (`Tracker.read_sweep`), as pandas tables with the Pareto frontiers:
`points` (one row per ordering and stage), `models` (one row per distinct model, a shared prefix being one),
`orderings` (each ordering's final model, best first)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.analysis.pareto import Direction, frontiers
from pipeline.analysis.significance import mean_ci, pairwise_comparisons
from pipeline.reporting.columns import (
    latency_column,
    metric_columns,
    report_objectives,
    report_runtimes,
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
    pairs: pd.DataFrame | None = None  # pairwise tests between the orderings' final models (see `comparisons`)
    pairs_how: str = ""  # what the tests compared, or why there are none
    split: str = "val"  # the split every choice reads: 'val', or 'test' for a sweep that measured no validation split

    @property
    def objectives(self) -> dict[str, Direction]:
        return report_objectives(self.runtime, self.split)

    @property
    def top1(self) -> str:
        """The top-1 column rankings, frontiers and tests use (validation)."""
        return top1_column(self.runtime, self.split)

    @property
    def test_top1(self) -> str:
        """The test split's top-1 column, reported beside."""
        return top1_column(self.runtime, "test")


def default_runtime(runs: SweepRuns) -> str:
    """The sweep's first deploy runtime whose metrics were logged, else 'torch'."""
    tagged = [run.tags[TAGS.deploy_runtimes] for run in runs.stages if run.tags.get(TAGS.deploy_runtimes)]
    for runtime in tagged[0].split(",") if tagged else []:
        if runtime in report_runtimes()[1:] and any(latency_column(runtime) in run.metrics for run in runs.stages):
            return runtime
    return "torch"


def build_report(
    runs: SweepRuns,
    sweep_id: str,
    latency: dict[str, float] | None = None,
    runtime: str | None = None,
    correct_of: Callable[[str, str, str], np.ndarray | None] | None = None,
) -> SweepReport:
    """Tables from a sweep's runs as `Tracker.read_sweep` returns them.

    `runtime`: whose top-1 and latency the frontiers use (default: `default_runtime`); `latency` (cache key -> ms)
    replaces that runtime's latency logged by each stage, e.g. with a side-by-side re-measurement;
    `correct_of(stage_run_id, runtime, split)` gives a stage's per-image correctness for the paired tests, which
    run on the validation split (the test split for a sweep that measured none)."""
    runtime = runtime or default_runtime(runs)
    if runtime not in report_runtimes():
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(report_runtimes())}")
    chains = _latest_finished_chains(runs.chains)
    if not chains:
        raise ValueError(f"sweep {sweep_id!r} has no finished ordering yet; run `make sweep` first")
    stages = [run for run in runs.stages if run.parent_id in chains]
    points = _points(stages, chains)
    by_id = {run.run_id: run for run in runs.chains}
    points["chain_run_id"] = _parents(stages, points)
    parents = [by_id[run_id] for run_id in points.chain_run_id]
    points["chain_epochs"] = [_chain_epochs(chain) for chain in parents]
    points["control"] = [chain.tags.get(TAGS.control_epochs) is not None for chain in parents]
    if runtime != "torch" and points[latency_column(runtime)].isna().all():
        raise ValueError(f"sweep {sweep_id!r} logged no {runtime} metrics (its recipe's deploy.runtimes)")
    if latency is not None:
        points[latency_column(runtime)] = points["cache_key"].map(latency)
    split = choice_split(points, runtime)
    models = _models(points, runtime, split)
    orderings = _orderings(points, models, runtime, split)
    meta = _sweep_facts(runs, chains, stages)
    meta["latency_source"] = "side by side" if latency is not None else "per stage"
    meta["runtime"] = runtime
    meta["split"] = split
    meta["seeds"] = sorted(set(points.seed) - {""}, key=lambda x: int(x)) if points.seed.nunique() > 1 else []
    pairs, how = (None, "no paired tests: per-image predictions were not read")
    if correct_of is not None:
        pairs, how = comparisons(points, models, runtime, lambda run_id: correct_of(run_id, runtime, split), split)
    return SweepReport(sweep_id, meta, points, models, orderings, runtime, pairs, how, split)


def choice_split(points: pd.DataFrame, runtime: str) -> str:
    """'val' when the sweep measured a validation split (every choice reads it), else 'test' (sweeps from before
    validation splits: the report says that its choices then overstate the winner)."""
    return "val" if points[top1_column(runtime, "val")].notna().any() else "test"


def _latest_finished_chains(chains: list[RunRecord]) -> dict[str, tuple[str, str]]:
    """run id -> (ordering, seed) of each (ordering, seed)'s latest FINISHED chain run (a chain rerun: its latest
    run); the seed is '' for runs logged before chains carried one."""
    latest: dict[tuple[str, str], RunRecord] = {}
    for run in sorted(chains, key=lambda r: r.start_time):
        if run.status == "FINISHED":
            latest[run.tags[TAGS.ordering], run.tags.get(TAGS.seed, "")] = run
    return {run.run_id: key for key, run in latest.items()}


def _parents(stages: list[RunRecord], points: pd.DataFrame) -> list[str]:
    parent = {run.run_id: run.parent_id for run in stages}
    return [parent[run_id] for run_id in points.run_id]


def _chain_epochs(chain: RunRecord) -> int:
    """Epochs the chain's stages trained in all (its `training_epochs` param; -1 when an older run lacks it)."""
    return int(chain.params.get("training_epochs", -1))


def _sweep_facts(runs: SweepRuns, chains: dict[str, str], stages: list[RunRecord]) -> dict[str, object]:
    """The sweep run's params and metrics, its id and recipe, the orderings that failed, the CPU it ran on."""
    sweep = max(runs.sweeps, key=lambda r: r.start_time, default=None)
    meta: dict[str, object] = {**sweep.params, **sweep.metrics} if sweep else {}
    meta["sweep"] = sweep.tags.get(TAGS.sweep) if sweep else None
    meta["run_id"] = sweep.run_id if sweep else None
    meta["recipe"] = sweep.tags.get(TAGS.recipe) if sweep else None
    finished = {ordering for ordering, _ in chains.values()}
    failed = {run.tags[TAGS.ordering] for run in runs.chains if run.status == "FAILED"}
    meta["failed_orderings"] = sorted(failed - finished)
    cpu = [run.tags[TAGS.cpu_capability] for run in stages if run.tags.get(TAGS.cpu_capability)]
    meta["cpu_capability"] = cpu[0] if cpu else None
    return meta


def _points(stages: list[RunRecord], chains: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """One row per stage run of the finished chains; a metric a stage did not log (e.g. an older run) is NaN,
    shown as "–". The ordering and seed are its chain's (older stage runs carried the ordering too)."""
    rows = [
        {
            "run_id": run.run_id,
            "ordering": chains[run.parent_id][0],
            "seed": chains[run.parent_id][1],
            "stage": run.tags[TAGS.stage],
            "stage_index": int(run.tags[TAGS.stage_index]),
            "cache_key": run.tags[TAGS.cache_key],
            "cached": run.flag(TAGS.cached),
            **{metric: run.metrics.get(metric, float("nan")) for metric in metric_columns()},
        }
        for run in stages
    ]
    return pd.DataFrame(rows).sort_values(["ordering", "seed", "stage_index"]).reset_index(drop=True)


def _models(points: pd.DataFrame, runtime: str, split: str) -> pd.DataFrame:
    """Distinct models (a shared prefix is one model), labelled by the shortest ordering prefix reaching them,
    with their frontier flags in `runtime` (`pareto`, `pareto_<a>__<b>`) and the 3-D flag in every runtime
    that was measured (`pareto[<runtime>]`)."""
    seeded = points.seed.nunique() > 1
    paths = [">".join(_path(o, i)) + (f" (seed {s})" if seeded else "")
             for o, i, s in zip(points.ordering, points.stage_index, points.seed, strict=True)]  # fmt: skip
    points = points.assign(path=paths)
    models = points.sort_values("stage_index").drop_duplicates("cache_key").set_index("cache_key")
    models = models[["path", "stage", "stage_index", *[c for c in metric_columns() if c in models]]]
    objectives = report_objectives(runtime, split)
    flags = frontiers(models.dropna(subset=list(objectives)), objectives)
    for other in report_runtimes():
        measured = models.dropna(subset=list(report_objectives(other, split)))
        if not measured.empty:
            flags[f"pareto[{other}]"] = frontiers(measured, report_objectives(other, split))["pareto"]
    return models.join(flags).fillna({c: False for c in flags.columns}).astype({c: bool for c in flags.columns})


def _path(ordering: str, index: int) -> list[str]:
    return ["baseline", *ordering.split(">")[:index]] if index else ["baseline"]


def _orderings(points: pd.DataFrame, models: pd.DataFrame, runtime: str, split: str) -> pd.DataFrame:
    """Each ordering's final model: top-1 on `split` (what the ranking reads) and on the test split (reported) and
    latency in `runtime` (columns named by it), torch eager's beside.

    With several seeds, one row per ordering holds the means over its seeds' final models (deltas and ratios
    against each seed's own baseline), `seeds`, the 95 % t interval of top-1 (`top1_ci_low` / `top1_ci_high`, NaN
    for one seed), the seed-to-seed standard deviations of top-1 and latency, and `pareto` when at least half the
    seeds' final models are on the frontier (`pareto_share`)."""
    per_seed = _finals_per_seed(points, models, runtime, split)
    top1, latency = top1_column(runtime, split), latency_column(runtime)
    grouped = per_seed.groupby("ordering", sort=False)
    out = grouped.mean(numeric_only=True)
    out["stages"] = grouped["stages"].first()
    out["stages_trained"] = grouped["stages_trained"].sum()
    out["seeds"] = grouped.size()
    out["pareto_share"] = grouped["pareto"].mean()
    out["pareto"] = out["pareto_share"] >= 0.5
    intervals = {name: mean_ci(values.to_numpy()) if len(values) > 1 else None for name, values in grouped[top1]}
    out["top1_ci_low"] = [iv.low if iv else float("nan") for iv in (intervals[n] for n in out.index)]
    out["top1_ci_high"] = [iv.high if iv else float("nan") for iv in (intervals[n] for n in out.index)]
    out["top1_std"] = grouped[top1].std()
    out["latency_std"] = grouped[latency].std()
    out = out.sort_values(["pareto", top1], ascending=[False, False])
    return out.reset_index()


def _finals_per_seed(points: pd.DataFrame, models: pd.DataFrame, runtime: str, split: str) -> pd.DataFrame:
    """One row per (ordering, seed): its final model against that seed's baseline (deltas on `split`)."""
    baselines = points[points.stage_index == 0].drop_duplicates("seed").set_index("seed")
    finals = points.sort_values("stage_index").groupby(["ordering", "seed"]).tail(1)
    base = baselines.loc[finals["seed"]].set_index(finals.index)
    top1, latency = top1_column(runtime, split), latency_column(runtime)
    test_top1 = top1_column(runtime, "test")
    out = pd.DataFrame({"ordering": finals["ordering"], "seed": finals["seed"], "final_run_id": finals["run_id"]})
    out["stages"] = finals["stage_index"]
    out[top1] = finals[top1]
    out[test_top1] = finals[test_top1]
    out["delta_top1"] = finals[top1] - base[top1]
    out["artifact_bytes"] = finals["artifact_bytes"]
    out["size_ratio"] = finals["artifact_bytes"] / base["artifact_bytes"]
    out[latency] = finals[latency]
    out["speedup"] = base[latency] / finals[latency]
    if runtime != "torch":
        out["torch_latency_ms_p50"] = finals["latency_ms_p50"]
        out["torch_speedup"] = base["latency_ms_p50"] / finals["latency_ms_p50"]
        out[f"{runtime}.file_bytes"] = finals[f"{runtime}.file_bytes"]
    out["pareto"] = models.loc[finals["cache_key"], "pareto"].to_numpy()
    controls = finals[finals["control"]]
    control_top1 = dict(zip(zip(controls.seed, controls.chain_epochs, strict=True), controls[top1], strict=True))
    out["delta_control"] = [
        t - control_top1.get((seed, e), float("nan")) if not c else float("nan")
        for t, seed, e, c in zip(finals[top1], finals.seed, finals.chain_epochs, finals["control"], strict=True)
    ]
    trained = points.groupby(["ordering", "seed"])["cached"].agg(lambda c: int((~c).sum()))
    out["stages_trained"] = [int(trained[o, seed]) for o, seed in zip(out.ordering, out.seed, strict=True)]
    return out


# --- which differences the data supports: paired tests on per-image predictions ------------------------

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000


def comparisons(
    points: pd.DataFrame,
    models: pd.DataFrame,
    runtime: str,
    correct_of: Callable[[str], np.ndarray | None],
    split: str = "val",
) -> tuple[pd.DataFrame | None, str]:
    """Pairwise tests between the orderings' final models (`pipeline.analysis.significance.pairwise_comparisons`)
    on their per-image correctness on `split` in `runtime`, `correct_of(stage_run_id)` giving it (None: not
    stored); returns the pairs table (None when fewer than two orderings have predictions) and a sentence on what
    was compared."""
    finals = _finals_per_seed(points, models, runtime, split)
    seeds = sorted(set.intersection(*(set(g.seed) for _, g in finals.groupby("ordering"))))
    arrays, missing = {}, []
    for ordering, group in finals.groupby("ordering", sort=False):
        by_seed = dict(zip(group.seed, group.final_run_id, strict=True))
        per_seed = [correct_of(by_seed[seed]) for seed in seeds]
        if any(a is None for a in per_seed):
            missing.append(ordering)
        else:
            arrays[ordering] = np.stack(per_seed)
    if len(arrays) < 2:
        return None, f"no paired tests: fewer than two orderings have stored per-image predictions ({runtime})"
    pairs = pairwise_comparisons(arrays, alpha=ALPHA, n_resamples=BOOTSTRAP_RESAMPLES, rng=0)
    images = next(iter(arrays.values())).shape[1]
    how = (
        f"paired tests on the same {images:,} {'validation' if split == 'val' else 'test'} images x {len(seeds)} "
        f"seed(s) ({runtime}): exact McNemar "
        f"(discordant images pooled over seeds) and a paired bootstrap {100 * (1 - ALPHA):.0f} % interval of the "
        f"top-1 difference ({BOOTSTRAP_RESAMPLES} resamples of images{' and seeds' if len(seeds) > 1 else ''}), "
        f"Holm-corrected over {len(pairs)} pairs; 'better' needs p(Holm) < {ALPHA} and the interval above 0"
    )
    if missing:
        how += f"; without stored predictions, not compared: {', '.join(missing)}"
    return pairs, how
