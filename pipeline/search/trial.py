"""One trial of a search: the chain it samples (ordering and settings), run through the ordinary `Runner` nested under
the search's MLflow run, ended early when a constraint is out of reach of every later stage, and told to Optuna."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.metrics import metric_catalogue
from pipeline.recipe import Recipe, StageSpec
from pipeline.run.runner import Runner, StageResult
from pipeline.search.config import ORDERING_PARAM, Constraint, ParamRange, SearchConfig, is_integer_field
from pipeline.search.pruning import FidelityReporter, PrunedChain, make_pruner, open_fidelity_study, peer_group
from pipeline.search.study import SearchPlan
from pipeline.tracking import TAGS, Tracker
from stages import get_stage

log = logging.getLogger("pipeline")


def search_chain(recipe: Recipe, ordering: Sequence[str], settings: dict[str, Any]) -> Recipe:
    """One trial's chain: the stages of `ordering` with the sampled `settings` ({"prune.pruning_ratio": 0.5,
    "budget.epochs": 6}) applied over the recipe's configs, then the budget, as `as_chain` does."""
    by_stage: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        stage, _, name = key.partition(".")
        by_stage.setdefault(stage, {})[name] = value
    specs = []
    for spec in recipe.stage_specs():
        fields = by_stage.get(spec.name)
        config = type(spec.config).model_validate({**spec.config.model_dump(), **fields}) if fields else spec.config
        specs.append(StageSpec(spec.name, config))
    update: dict[str, Any] = {"stages": specs, "search": None}
    if "budget" in by_stage and recipe.budget is not None:
        update["budget"] = recipe.budget.model_copy(update=by_stage["budget"])
    return recipe.model_copy(update=update).as_chain(list(ordering))


def sample_trial(trial, plan: SearchPlan) -> tuple[list[str], dict[str, Any]]:
    """(ordering, settings) for an Optuna trial: the ordering, then each space field of a stage in it."""
    ordering = trial.suggest_categorical(ORDERING_PARAM, plan.orderings).split(">")
    specs = {s.name: s for s in plan.recipe.stage_specs()}
    settings = {}
    for key, values in plan.config.space.items():
        stage, _, name = key.partition(".")
        if key != "budget.epochs" and stage not in ordering:
            continue
        integer = key == "budget.epochs" or is_integer_field(type(specs[stage].config), name)
        settings[key] = _suggest(trial, key, values, integer=integer)
    return ordering, settings


def _suggest(trial, key: str, values: ParamRange, *, integer: bool) -> Any:
    if values.choices is not None:
        return trial.suggest_categorical(key, values.choices)
    if integer:
        step = int(values.step or 1)
        return trial.suggest_int(key, int(values.low), int(values.high), step=step, log=values.log)
    value = trial.suggest_float(key, values.low, values.high, step=values.step, log=values.log)
    # On a step grid Optuna returns low + k * step, e.g. 0.6000000000000001 for 0.3 + 3 * 0.1: run (and log) 0.6.
    return float(f"{value:.12g}") if values.step is not None else value


def unreachable_constraint(
    metrics: dict[str, float],
    remaining: list[StageSpec],
    constraints: list[Constraint],
    catalogue: dict[str, tuple[str | None, str | None]],
    timing_margin: float,
) -> str | None:
    """Why a chain cannot meet its constraints any more, or None: a bound on a `bytes` or `compute` metric that the
    model after this stage misses (timed metrics by more than `timing_margin` of the bound), when no stage in
    `remaining` declares it can lower that kind of metric. Accuracy bounds never end a chain: training may lift it."""
    for constraint in constraints:
        kind = catalogue.get(constraint.metric, (None, None))[1]
        value = metrics.get(constraint.metric)
        if kind is None or value is None:
            continue
        timed = "latency" in constraint.metric or "throughput" in constraint.metric
        slack = timing_margin * abs(constraint.bound) if timed else 0.0
        if constraint.violation(value) <= slack:
            continue
        able = [s.name for s in remaining if (kinds := get_stage(s.name).can_lower(s.config)) is None or kind in kinds]
        if not able:
            later = ", ".join(s.name for s in remaining)
            return (
                f"{constraint} is out of reach: {constraint.metric} = {value:g}, and no later stage ({later}) lowers it"
            )
    return None


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one worker shares."""

    plan: SearchPlan
    search_run_id: str
    cache_dir: Path
    tracker: Tracker
    progress: bool
    worker: int = 0
    storage: Any = None  # the study's Optuna storage, where the pruner's fidelity studies live too
    fidelity_studies: dict[str, Any] = field(default_factory=dict)  # peer group -> its fidelity study, opened once

    @property
    def constraints(self) -> list[Constraint]:
        return self.plan.config.parsed_constraints()

    def runner(self, chain: Recipe, tags: dict[str, str], params: dict[str, Any], run_name: str, **options) -> Runner:
        """A runner for one of the search's chains (a trial, a confirmation), nested under the search's run and
        tagged with its id; `options` go to `Runner` as they are."""
        return Runner(chain, cache_dir=self.cache_dir, tracker=self.tracker, progress=self.progress,
                      parent_run_id=self.search_run_id, tags={TAGS.search: self.plan.search_id, **tags},
                      params=params, run_name=run_name, **options)  # fmt: skip

    def fidelity(self, trial, chain: Recipe) -> FidelityReporter | None:
        """The trial's reporter to its peer group's fidelity study, or None without a pruner."""
        cfg = self.plan.config.pruner
        if not cfg.enabled:
            return None
        group = peer_group(cfg, trial.params)
        if group not in self.fidelity_studies:
            pruner = make_pruner(cfg, longest_chain_epochs(self.plan))
            self.fidelity_studies[group] = open_fidelity_study(self.storage, self.plan.search_id, group, pruner)
        study = self.fidelity_studies[group]
        fidelity_trial = study.ask()
        fidelity_trial.set_user_attr("search_trial", trial.number)
        trial.set_user_attr("fidelity", [study.study_name, fidelity_trial.number])
        epochs = stage_epochs(chain)
        offsets = [sum(epochs[:i]) for i in range(len(epochs))]
        return FidelityReporter(study, fidelity_trial, offsets, sum(epochs))


def stage_epochs(chain: Recipe) -> list[int]:
    """Epochs each stage of the chain trains (the baseline left out)."""
    return [getattr(s.config, "total_epochs", lambda: 0)() for s in chain.stage_specs()]


def longest_chain_epochs(plan: SearchPlan) -> int:
    """The most epochs any trial's chain trains (at the space's largest `budget.epochs`, if sampled)."""
    epochs = plan.config.space.get("budget.epochs")
    settings = {"budget.epochs": int(max(epochs.endpoints()))} if epochs is not None else {}
    chains = (search_chain(plan.recipe, ordering.split(">"), settings) for ordering in plan.orderings)
    return max((sum(stage_epochs(chain)) for chain in chains), default=1) or 1


def run_trial(trial, ctx: TrialContext) -> tuple[float, ...]:
    """Sample, run the chain (ending it early when a constraint is out of reach), tell Optuna its objectives and
    constraint violations, and keep what the report needs in the trial's user attributes."""
    cfg, recipe = ctx.plan.config, ctx.plan.recipe
    ordering, settings = sample_trial(trial, ctx.plan)
    chain = search_chain(recipe, ordering, settings)
    catalogue = metric_catalogue(recipe.deploy.runtimes)

    def stop(result: StageResult, remaining: list[StageSpec]) -> str | None:
        return unreachable_constraint(
            result.metrics, remaining, ctx.constraints, catalogue, cfg.early_stop.timing_margin
        )

    reporter = ctx.fidelity(trial, chain)
    runner = ctx.runner(
        chain,
        {TAGS.trial: str(trial.number)},
        {"trial": trial.number, "search_worker": ctx.worker, **{f"search.{k}": v for k, v in settings.items()}},
        f"trial {trial.number}: {chain.ordering}",
        stop_after=stop if cfg.early_stop.enabled else None,
        on_epoch=reporter,
        epoch_validation=cfg.pruner.images if reporter is not None else None,
    )
    log.info("trial %d: %s %s", trial.number, chain.ordering, json.dumps(settings) if settings else "")
    summary = _run_reporting(trial, runner, reporter)
    final = summary.results[-1].metrics
    missing = [m for m in (*cfg.objectives, *(c.metric for c in ctx.constraints)) if m not in final]
    if missing:
        raise ValueError(f"the chain did not measure {', '.join(missing)} (a deploy runtime failed?)")
    violations = {str(c): c.violation(final[c.metric]) for c in ctx.constraints}
    for name, violation in violations.items():
        trial.set_constraint(name, violation)
    feasible = all(v <= 0 for v in violations.values()) and summary.early_stopped is None
    for key, value in trial_accounting(chain, summary.results, summary.early_stopped).items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("run_id", summary.run_id)
    trial.set_user_attr("deploy_dir", str(runner.deploy_dir_of(summary.results[-1])))
    trial.set_user_attr("chain", chain.ordering)
    trial.set_user_attr("metrics", {k: v for k, v in final.items() if k in catalogue})
    trial.set_user_attr("baseline", {k: v for k, v in summary.results[0].metrics.items() if k in catalogue})
    ctx.tracker.set_tags(summary.run_id, {TAGS.feasible: str(feasible).lower()})
    values = tuple(float(final[m]) for m in cfg.objectives)
    log.info("trial %d: %s%s", trial.number, _describe(cfg, final, feasible), _stopped(summary.early_stopped))
    return values


def _run_reporting(trial, runner: Runner, reporter: FidelityReporter | None):
    """Run the trial's chain; end its fidelity trial (if any) as the chain ended, and record a pruned trial (its
    reason and epochs) before telling Optuna it was pruned."""
    from optuna.trial import TrialState

    try:
        summary = runner.run()
    except PrunedChain as pruned:
        assert reporter is not None
        reporter.finish(TrialState.PRUNED)
        trial.set_user_attr("chain", runner.recipe.ordering)
        trial.set_user_attr("pruned", str(pruned))
        for key, value in reporter.accounting().items():
            trial.set_user_attr(key, value)
        log.info("trial %d: %s", trial.number, pruned)
        raise
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            trial.set_user_attr("interrupted", True)  # resumed with the same settings next time
        if reporter is not None:
            reporter.finish(TrialState.FAIL)
        raise
    if reporter is not None:  # a trial ended early by its constraints did not finish: pruned, for its peers
        reporter.finish(TrialState.COMPLETE if summary.early_stopped is None else TrialState.PRUNED)
    return summary


def trial_accounting(chain: Recipe, results: list[StageResult], early_stopped: str | None) -> dict[str, Any]:
    """Stage runs and epochs a trial trained, took from the cache, and skipped by ending early; the baseline, which
    every trial shares, is left out."""
    epochs = stage_epochs(chain)
    done = {r.index - 1: r for r in results if r.index > 0}
    return {
        "early_stopped": early_stopped,
        "stages_trained": sum(not r.cached for r in done.values()),
        "stages_reused": sum(r.cached for r in done.values()),
        "stages_skipped": len(epochs) - len(done),
        "epochs_trained": sum(epochs[i] for i, r in done.items() if not r.cached),
        "epochs_reused": sum(epochs[i] for i, r in done.items() if r.cached),
        "epochs_skipped": sum(e for i, e in enumerate(epochs) if i not in done),
    }


def _describe(cfg: SearchConfig, final: dict[str, float], feasible: bool) -> str:
    shown = ", ".join(f"{m} {final[m]:.4g}" for m in cfg.objectives)
    return f"{shown} ({'feasible' if feasible else 'infeasible'})"


def _stopped(reason: str | None) -> str:
    return f"; ended early: {reason}" if reason else ""


# --- workers --------------------------------------------------------------------------------------------------
