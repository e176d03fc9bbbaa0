"""A search's outcome, read from its Optuna study (pure: no MLflow): its trials, the Pareto set of the feasible ones,
the best model under the constraints, the hypervolume after each trial, what early stopping and the cache saved, and
(given a sweep's models) how its frontier compares with the sweep's, measured by the same hypervolume code.
`pipeline.reporting.search` writes it as a report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis.pareto import hypervolume, pareto_mask
from pipeline.analysis.significance import Interval, mean_ci
from pipeline.search.config import ORDERING_PARAM, Constraint


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the report needs it."""

    number: int
    state: str  # COMPLETE, PRUNED (stopped by the pruner: never on the frontier), FAIL, RUNNING, WAITING
    chain: str  # the ordering it ran
    params: dict[str, Any]
    metrics: dict[str, float]
    constraints: dict[str, float]  # constraint -> violation (<= 0 satisfied)
    early_stopped: str | None
    run_id: str | None
    deploy_dir: str | None
    accounting: dict[str, int]
    seconds: float | None
    baseline: dict[str, float]
    interrupted: bool = False  # stopped by Ctrl-C or a kill: rerun with the same settings when the search resumes
    retried: bool = False  # failed by a stale heartbeat (its worker died) and retried by Optuna
    pruned: str | None = None  # why the pruner stopped it (state PRUNED)

    @property
    def settings(self) -> dict[str, Any]:
        """The sampled stage settings, the ordering left out."""
        return {k: v for k, v in self.params.items() if k != ORDERING_PARAM}

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def configuration(self) -> tuple:
        """What the trial ran: its ordering and settings, floats to 12 significant digits (`pipeline.search.study`
        runs a stepped float so: 0.6000000000000001 and 0.6 are one configuration)."""
        settings = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in self.settings.items()}
        return (self.chain, tuple(sorted(settings.items())))

    @property
    def feasible(self) -> bool:
        """Finished to its last stage and within every constraint."""
        return self.complete and self.early_stopped is None and all(v <= 0 for v in self.constraints.values())


def trial_records(study) -> list[TrialRecord]:
    """Every trial of an Optuna study of `pipeline.search.study`, oldest first."""
    out = []
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    for t in trials:
        attrs = t.user_attrs
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        accounting = {k: int(v) for k, v in attrs.items() if k.startswith(("stages_", "epochs_"))}
        out.append(
            TrialRecord(
                t.number,
                t.state.name,
                attrs.get("chain", t.params.get(ORDERING_PARAM, "?")),
                dict(t.params),
                dict(attrs.get("metrics", {})),
                dict(t.constraints),
                attrs.get("early_stopped"),
                attrs.get("run_id"),
                attrs.get("deploy_dir"),
                accounting,
                seconds,
                dict(attrs.get("baseline", {})),
                bool(attrs.get("interrupted")),
                t.number in retried,
                attrs.get("pruned"),
            )
        )
    return out


@dataclass
class Geometry:
    """How hypervolumes are measured: the objectives, their reference point (a bound of the constraints, else the
    uncompressed baseline for a metric to lower, else the worst value seen) and each objective's scale (its spread
    over every point compared), so the same code measures any set of points alike."""

    objectives: dict[str, str]
    reference: np.ndarray
    scale: np.ndarray

    @property
    def maximize(self) -> list[bool]:
        return [d == "max" for d in self.objectives.values()]

    def volume(self, points: np.ndarray) -> float:
        return hypervolume(points, self.maximize, self.reference, self.scale) if len(points) else 0.0


def geometry(
    objectives: dict[str, str], constraints: list[Constraint], baseline: dict[str, float], points: list[np.ndarray]
) -> Geometry:
    """The reference point and scales for hypervolumes over `points` (arrays of n x objectives, stacked).

    Per objective, the reference is the constraint's bound when one bounds it in the objective's direction; else the
    worst value among the points (and, for a metric to lower, the uncompressed baseline's), pushed out by a tenth of
    the spread so that the worst point still adds volume. The scale is the spread from the reference to the best."""
    usable = [p for p in points if len(p)]
    stacked = np.vstack(usable) if usable else np.zeros((0, len(objectives)))
    reference, scale = [], []
    for i, (metric, direction) in enumerate(objectives.items()):
        column = list(stacked[:, i]) if len(stacked) else []
        if direction == "min" and metric in baseline:
            column.append(baseline[metric])
        column = np.array(column or [0.0], dtype=float)
        worst = column.min() if direction == "max" else column.max()
        best = column.max() if direction == "max" else column.min()
        bounds = [c.bound for c in constraints if c.metric == metric and (c.op == ">=") == (direction == "max")]
        if bounds:
            ref = max(bounds) if direction == "max" else min(bounds)
        else:
            margin = 0.1 * (abs(best - worst) or abs(worst) or 1.0)
            ref = worst - margin if direction == "max" else worst + margin
        reference.append(float(ref))
        spread = float(abs(ref - best))
        scale.append(spread if spread > 0 else 1.0)
    return Geometry(dict(objectives), np.array(reference), np.array(scale))


@dataclass(frozen=True)
class Confirmation:
    """One more seed of a Pareto configuration (`search.confirm_seeds`): the chain run again with another seed."""

    confirms: int  # the search trial whose configuration it repeats
    seed: int
    metrics: dict[str, float]
    run_id: str | None = None


@dataclass
class ConfirmedPoint:
    """A configuration of the search's Pareto set over every seed it ran: its trial's and its confirmations'."""

    trial: TrialRecord
    seeds: list[int]
    values: dict[str, list[float]]  # metric -> one value per seed, the trial's first
    constraints: list[Constraint]

    def interval(self, metric: str) -> Interval:
        return mean_ci(self.values[metric])

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values[metric]))

    @property
    def means(self) -> dict[str, float]:
        return {m: self.mean(m) for m in self.values}

    @property
    def feasible(self) -> bool:
        """Every constraint met by the seed mean."""
        return all(c.violation(self.mean(c.metric)) <= 0 for c in self.constraints if c.metric in self.values)


def confirm_frontier(
    outcome: SearchOutcome, confirmations: list[Confirmation], trial_seed: int
) -> tuple[list[ConfirmedPoint], list[ConfirmedPoint], ConfirmedPoint | None]:
    """(every confirmed configuration, the Pareto set of their seed means among those feasible by mean, the best
    of that set by the selection metric's mean). `trial_seed`: the seed the search's trials ran with."""
    by_trial: dict[int, list[Confirmation]] = {}
    for c in confirmations:
        by_trial.setdefault(c.confirms, []).append(c)
    points = []
    for trial in confirmation_targets(outcome):
        extra = sorted(by_trial.get(trial.number, []), key=lambda c: c.seed)
        shared = [m for m in trial.metrics if all(m in c.metrics for c in extra)]
        values = {m: [trial.metrics[m], *(c.metrics[m] for c in extra)] for m in shared}
        points.append(ConfirmedPoint(trial, [trial_seed, *(c.seed for c in extra)], values, outcome.constraints))
    usable = [p for p in points if p.feasible and all(m in p.values for m in outcome.objectives)]
    means = np.array([[p.mean(m) for m in outcome.objectives] for p in usable]).reshape(-1, len(outcome.objectives))
    mask = pareto_mask(means, [d == "max" for d in outcome.objectives.values()]) if usable else []
    front = [p for p, keep in zip(usable, mask, strict=True) if keep]
    metric, direction = outcome.selection
    sign = -1.0 if direction == "max" else 1.0
    ranked = sorted((p for p in front if metric in p.values), key=lambda p: sign * p.mean(metric))
    return points, front, ranked[0] if ranked else None


def confirmation_targets(outcome: SearchOutcome) -> list[TrialRecord]:
    """The configurations to confirm: the Pareto set (each model once) and the best feasible trial."""
    targets = list(outcome.pareto)
    if outcome.best is not None and all(outcome.best.configuration != t.configuration for t in targets):
        targets.append(outcome.best)
    return targets


@dataclass
class SearchOutcome:
    search_id: str
    objectives: dict[str, str]
    constraints: list[Constraint]
    selection: tuple[str, str]  # (metric, direction) that picks the best feasible model
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    best: TrialRecord | None
    geometry: Geometry
    hypervolume_history: list[tuple[int, float]] = field(default_factory=list)  # (trial number, after it)
    # With `search.confirm_seeds`: every Pareto configuration over its seeds, their Pareto set by seed means, and the
    # best by mean (what is registered); None when nothing was confirmed.
    confirmed: list[ConfirmedPoint] | None = None
    confirmed_front: list[ConfirmedPoint] | None = None
    confirmed_best: ConfirmedPoint | None = None

    @property
    def chosen(self) -> TrialRecord | None:
        """The trial whose model is registered: the best confirmed configuration by seed mean when the frontier
        was confirmed (None if no configuration meets the constraints on average), else the best trial."""
        if self.confirmed is not None:
            return self.confirmed_best.trial if self.confirmed_best is not None else None
        return self.best

    @property
    def confirmed_hypervolume(self) -> float | None:
        """The hypervolume of the confirmed frontier's seed means, on the search's geometry."""
        if self.confirmed_front is None:
            return None
        points = np.array([[p.mean(m) for m in self.objectives] for p in self.confirmed_front])
        return self.geometry.volume(points.reshape(-1, len(self.objectives)))

    def on_means(self) -> SearchOutcome:
        """This outcome with its confirmed frontier as its Pareto set, each point at its seed means."""
        front = [replace(p.trial, metrics={**p.trial.metrics, **p.means}) for p in self.confirmed_front or []]
        return replace(self, pareto=front)

    def with_confirmations(self, confirmations: list[Confirmation], trial_seed: int) -> SearchOutcome:
        """This outcome with its confirmed frontier (when any confirmation ran)."""
        if not confirmations:
            return self
        points, front, best = confirm_frontier(self, confirmations, trial_seed)
        return replace(self, confirmed=points, confirmed_front=front, confirmed_best=best)

    @property
    def hypervolume(self) -> float:
        return self.hypervolume_history[-1][1] if self.hypervolume_history else 0.0

    def on_front(self) -> set[int]:
        """Every trial whose model is in the Pareto set, repeats of those models included."""
        keys = {model_key(t, self.objectives) for t in self.pareto}
        return {t.number for t in self.trials if t.feasible and model_key(t, self.objectives) in keys}

    def totals(self) -> dict[str, float]:
        """The search's counts, logged as metrics of its MLflow run."""
        complete = [t for t in self.trials if t.complete]
        pruned = [t for t in self.trials if t.state == "PRUNED"]
        acc = {k: sum(t.accounting.get(k, 0) for t in complete + pruned) for k in _ACCOUNTING}
        # A repeat that ended early skipped what the first trial of its configuration skipped; without early stopping
        # that first trial would have trained it and the repeat found it in the cache: a skip is counted once.
        repeats = repeat_of(self.trials)
        firsts = [t for t in complete if t.number not in repeats]
        for k in ("stages_skipped", "epochs_skipped"):  # (a pruned trial's saved epochs are `epochs_pruned`)
            acc[k] = sum(t.accounting.get(k, 0) for t in firsts)
        to_train = acc["epochs_trained"] + acc["epochs_skipped"]  # what the trials would have trained, not stopped
        stages = acc["stages_trained"] + acc["stages_reused"]
        return {
            "trials_complete": len(complete),
            # Stopped by the pruner after a few epochs: not on the frontier; `epochs_pruned` were not trained.
            "trials_pruned": len(pruned),
            "epochs_pruned": float(sum(t.accounting.get("epochs_pruned", 0) for t in pruned)),
            # Samplers propose a point again (a small discrete space makes that common); the cache answers it.
            "trials_repeated": len(repeats),
            "trials_failed": sum(t.state == "FAIL" and not (t.interrupted or t.retried) for t in self.trials),
            "trials_early_stopped": sum(t.early_stopped is not None for t in complete),
            "trials_feasible": sum(t.feasible for t in self.trials),
            "pareto_size": len(self.pareto),
            "hypervolume": self.hypervolume,
            **(
                {
                    "confirmed_pareto_size": len(self.confirmed_front or []),
                    "confirmed_hypervolume": self.confirmed_hypervolume or 0.0,
                }
                if self.confirmed is not None
                else {}
            ),  # fmt: skip
            **{k: float(v) for k, v in acc.items()},
            "epochs_skipped_share": acc["epochs_skipped"] / to_train if to_train else 0.0,
            "stage_cache_hit_share": acc["stages_reused"] / stages if stages else 0.0,
        }


_ACCOUNTING = ("stages_trained", "stages_reused", "stages_skipped", "epochs_trained", "epochs_reused", "epochs_skipped")


def repeat_of(trials: list[TrialRecord]) -> dict[int, int]:
    """Finished trial number -> the earlier finished trial that ran the same configuration (repeats only)."""
    first: dict[tuple, int] = {}
    out = {}
    for t in sorted((t for t in trials if t.complete), key=lambda t: t.number):
        if t.configuration in first:
            out[t.number] = first[t.configuration]
        else:
            first[t.configuration] = t.number
    return out


def model_key(trial: TrialRecord, objectives: dict[str, str]) -> tuple:
    """A model as the Pareto set sees it: a repeat answered by the cache has its first trial's key."""
    return (trial.configuration, tuple(trial.metrics.get(m) for m in objectives))


def objective_values(trials: list[TrialRecord], objectives: dict[str, str]) -> np.ndarray:
    return np.array([[t.metrics[m] for m in objectives] for t in trials], dtype=float).reshape(-1, len(objectives))


def outcome_of(study, plan) -> SearchOutcome:
    """The outcome of a `pipeline.search.study` study, for `plan` (a SearchPlan)."""
    cfg = plan.config
    from pipeline.core.metrics import metric_catalogue

    direction = metric_catalogue(plan.recipe.deploy.runtimes)[cfg.selection_metric][0] or "max"
    return summarize(
        plan.search_id,
        trial_records(study),
        cfg.objectives,
        cfg.parsed_constraints(),
        (cfg.selection_metric, direction),
    )


def summarize(
    search_id: str,
    trials: list[TrialRecord],
    objectives: dict[str, str],
    constraints: list[Constraint],
    selection: tuple[str, str],
) -> SearchOutcome:
    """Pareto set, best feasible model and hypervolume history of a search's trials."""
    feasible = [t for t in trials if t.feasible and all(m in t.metrics for m in objectives)]
    values = objective_values(feasible, objectives)
    mask = pareto_mask(values, [d == "max" for d in objectives.values()]) if feasible else []
    front, points = [], set()
    for t, keep in zip(feasible, mask, strict=True):
        point = model_key(t, objectives)
        if keep and point not in points:  # a repeat answered by the cache is the same model: listed once
            front.append(t)
            points.add(point)
    baseline = next((t.baseline for t in trials if t.baseline), {})
    geo = geometry(objectives, constraints, baseline, [values])
    history, seen = [], []
    for trial in sorted(trials, key=lambda t: t.number):
        if not trial.complete:
            continue
        if trial in feasible:
            seen.append(trial)
        history.append((trial.number, geo.volume(objective_values(seen, objectives))))
    metric, direction = selection
    sign = -1.0 if direction == "max" else 1.0
    ranked = sorted(
        (t for t in feasible if metric in t.metrics),
        key=lambda t: (
            sign * t.metrics[metric],
            *[(-1 if d == "max" else 1) * t.metrics[m] for m, d in objectives.items()],
        ),
    )
    return SearchOutcome(
        search_id, dict(objectives), constraints, selection, trials, front, ranked[0] if ranked else None, geo, history
    )


# --- comparing with a sweep ---------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The search's Pareto set against a sweep's models that meet the same constraints, on one geometry."""

    sweep_id: str
    sweep_points: pd.DataFrame  # one row per finished sweep chain: label + objective columns, feasible ones only
    search_volume: float
    sweep_volume: float
    missed: list[TrialRecord]  # search Pareto points no sweep model dominates or equals
    sweep_dominated: list[str]  # sweep models some search Pareto point dominates
    sweep_equalled: list[str] = field(default_factory=list)  # sweep models a search Pareto point equals everywhere
    geometry: Geometry | None = None  # the one both volumes were measured on
    means: bool = False  # seed means on both sides (a confirmed frontier against a sweep's paths over its seeds)

    @property
    def sweep_standing(self) -> list[str]:
        """Sweep models no search Pareto point dominates or equals."""
        beaten = set(self.sweep_dominated) | set(self.sweep_equalled)
        return [label for label in map(str, self.sweep_points.index) if label not in beaten]


def compare_with_sweep(
    outcome: SearchOutcome, sweep_id: str, sweep_models: pd.DataFrame, *, means: bool = False
) -> Comparison:
    """`sweep_models`: one row per model (index: its label) with the objective columns. Both sets are measured
    with one geometry built from the union of their points."""
    objectives = outcome.objectives
    needed = list(dict.fromkeys([*objectives, *(c.metric for c in outcome.constraints)]))
    absent = [m for m in needed if m not in sweep_models.columns or sweep_models[m].isna().all()]
    if absent:
        raise ValueError(f"sweep {sweep_id!r} did not measure {', '.join(absent)}: its frontier cannot be compared")
    ok = sweep_models.dropna(subset=needed)
    for c in outcome.constraints:
        ok = ok.loc[np.array([c.violation(v) <= 0 for v in ok[c.metric]], dtype=bool)]
    if ok.empty:
        raise ValueError(f"no model of sweep {sweep_id!r} meets the search's constraints: nothing to compare with")
    mine, theirs = objective_values(outcome.pareto, objectives), ok[list(objectives)].to_numpy(dtype=float)
    baseline = next((t.baseline for t in outcome.trials if t.baseline), {})
    geo = geometry(objectives, outcome.constraints, baseline, [mine, theirs])
    signs = np.where(geo.maximize, -1.0, 1.0)

    def dominates_or_equals(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(((a * signs) <= (b * signs)).all())

    missed = [
        t for t, p in zip(outcome.pareto, mine, strict=True) if not any(dominates_or_equals(q, p) for q in theirs)
    ]
    dominated = [
        label
        for label, q in zip(ok.index, theirs, strict=True)
        if any(dominates_or_equals(p, q) and not np.array_equal(p, q) for p in mine)
    ]
    equalled = [label for label, q in zip(ok.index, theirs, strict=True) if any(np.array_equal(p, q) for p in mine)]
    return Comparison(
        sweep_id,
        ok,
        geo.volume(mine),
        geo.volume(theirs),
        missed,
        list(map(str, dominated)),
        list(map(str, equalled)),
        geo,
        means,
    )
