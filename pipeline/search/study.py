"""Searches: Optuna samples orderings and stage settings; every trial is a chain through the ordinary `Runner`.

A recipe's `search:` block (`pipeline.search.config`) names the space, the objectives, the constraints and a
budget. The search is one Optuna study (in SQL storage beside MLflow's store, so an interrupted search resumes and
workers share it) and one MLflow run (tag `search`, `run_type=search`); each trial is a chain run nested under it,
tagged `trial`, with the sampled settings as params. Trials reuse the stage cache like sweeps do: a prefix another
trial trained (same stages, same settings) is not trained again.

A trial ends early when, after a stage, a constraint on a metric is violated that no later stage of its chain can
lower (`unreachable_constraint`); the trial is still told to Optuna, as infeasible, so the sampler learns from it.
A killed search resumes where it was: finished trials stay in the study, and a trial that was interrupted runs again
with the same settings (its finished stages come from the cache).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.hashing import digest
from pipeline.core.metrics import metric_catalogue, test_name
from pipeline.recipe import Recipe, StageSpec
from pipeline.run.executors import Executor, get_executor
from pipeline.run.keys import evaluation_key
from pipeline.run.runner import Runner, StageResult, default_cache_dir, termination_as_interrupt
from pipeline.search.config import ORDERING_PARAM, Constraint, ParamRange, SearchConfig, is_integer_field
from pipeline.search.outcome import outcome_of
from pipeline.search.space import search_orderings
from pipeline.tracking import TAGS, RunType, Tracker
from stages import get_stage

log = logging.getLogger("pipeline")

# A worker that stops beating for GRACE_S (killed, machine lost) has its trial failed and retried by the next worker.
HEARTBEAT_S, GRACE_S = 30, 180
# Search keys that say how long or where a search runs, not what it searches: changing them resumes the same study.
BUDGET_KEYS = {"trials", "timeout_minutes", "workers", "registry", "registry_name", "select"}


@dataclass(frozen=True)
class SearchPlan:
    """What a search samples from, its id (also its Optuna study's name) and where the study is stored."""

    recipe: Recipe
    search_id: str
    orderings: list[str]  # stage names joined by '>'
    storage: str

    @property
    def config(self) -> SearchConfig:
        assert self.recipe.search is not None
        return self.recipe.search


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


def plan_search(recipe: Recipe, *, tracking_uri: str, cache_dir: Path, new: bool = False) -> SearchPlan:
    """The search of `recipe`. Its id is the recipe's name and a hash of everything that defines its trials, so the
    same search started again resumes; `new` gives it a fresh id (a time stamp suffix)."""
    if recipe.search is None:
        raise ValueError(f"recipe {recipe.name!r} has no `search:` block")
    orderings = [">".join(o) for o in search_orderings(recipe)]
    defining = recipe.to_dict()
    defining["search"] = {k: v for k, v in defining["search"].items() if k not in BUDGET_KEYS}
    content = digest({"recipe": defining, "evaluation": evaluation_key(recipe)})[:8]
    search_id = f"{recipe.name}-{content}" + (time.strftime("-%Y%m%d-%H%M%S") if new else "")
    storage = recipe.search.storage or default_storage(tracking_uri, cache_dir)
    return SearchPlan(recipe, search_id, orderings, storage)


def default_storage(tracking_uri: str, cache_dir: Path) -> str:
    """$OPTUNA_STORAGE, else `optuna.db` beside MLflow's SQLite file, else in the cache folder. (Not MLflow's own
    database: both keep an `alembic_version` table of their own schema.)"""
    import os

    if os.environ.get("OPTUNA_STORAGE"):
        return os.environ["OPTUNA_STORAGE"]
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path(cache_dir).resolve() / 'optuna.db'}"


def open_study(plan: SearchPlan, worker: int = 0, *, create: bool = True):
    """The search's Optuna study (created on first use unless `create` is false: then a missing study is a
    ValueError), with the sampler of `search.sampler` seeded by the search's seed, the worker and the trials the
    study holds already, so a resumed search or a second worker does not propose the same trials again."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the pipeline logs one line per trial itself
    engine = {}
    if plan.storage.startswith("sqlite:///"):
        path = Path(plan.storage.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise ValueError(f"the study of search {plan.search_id} is not where it was stored: {path} is missing")
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # workers share the file: wait for the lock, do not fail
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            plan.storage,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    directions = ["maximize" if d == "max" else "minimize" for d in plan.config.objectives.values()]
    if create:
        study = optuna.create_study(
            storage=storage, study_name=plan.search_id, directions=directions, load_if_exists=True
        )
    else:
        try:
            study = optuna.load_study(study_name=plan.search_id, storage=storage)
        except KeyError:
            raise ValueError(f"no study {plan.search_id!r} in {safe_url(plan.storage)}") from None
    study.sampler = make_sampler(plan.config, worker, offset=len(study.get_trials(deepcopy=False)))
    return study


def safe_url(url: str) -> str:
    """A storage URL with its password masked, fit for logs and MLflow params."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: nothing to mask that we can find
        return url


def make_sampler(cfg: SearchConfig, worker: int = 0, offset: int = 0):
    """The configured sampler, seeded by the search's seed, the worker and `offset` (trials already in the study)."""
    import optuna

    seed = (cfg.seed + 1009 * worker + 7919 * offset) % 2**32
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, cfg.startup_trials))
    with warnings.catch_warnings():  # multivariate/group/constant_liar are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=cfg.startup_trials,
            multivariate=True,
            group=True,  # the space depends on the ordering: a stage's fields only when the stage is in it
            constant_liar=cfg.workers > 1,
        )


# --- one trial ------------------------------------------------------------------------------------------------


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

    @property
    def constraints(self) -> list[Constraint]:
        return self.plan.config.parsed_constraints()


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

    runner = Runner(
        chain,
        cache_dir=ctx.cache_dir,
        tracker=ctx.tracker,
        progress=ctx.progress,
        parent_run_id=ctx.search_run_id,
        tags={TAGS.search: ctx.plan.search_id, TAGS.trial: str(trial.number)},
        params={"trial": trial.number, "search_worker": ctx.worker, **{f"search.{k}": v for k, v in settings.items()}},
        stop_after=stop if cfg.early_stop.enabled else None,
        run_name=f"trial {trial.number}: {chain.ordering}",
    )
    log.info("trial %d: %s %s", trial.number, chain.ordering, json.dumps(settings) if settings else "")
    try:
        summary = runner.run()
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # resumed with the same settings next time
        raise
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


def trial_accounting(chain: Recipe, results: list[StageResult], early_stopped: str | None) -> dict[str, Any]:
    """Stage runs and epochs a trial trained, took from the cache, and skipped by ending early; the baseline, which
    every trial shares, is left out."""
    epochs = [getattr(s.config, "total_epochs", lambda: 0)() for s in chain.stage_specs()]
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


@dataclass(frozen=True)
class SearchWorkerJob:
    """One worker's share of a search: it runs trials of the shared study until the budget is spent."""

    plan: SearchPlan
    worker: int
    search_run_id: str
    cache_dir: Path
    tracking_uri: str
    experiment_id: str
    progress: bool
    deadline: float | None  # time.time() after which no new trial starts

    def failed(self, error: str) -> WorkerResult:
        return WorkerResult(self.worker, 0, error)


@dataclass
class WorkerResult:
    worker: int
    trials: int  # trials this worker ran
    error: str | None = None


def counted_trials(study) -> int:
    """Trials that count against `search.trials`: finished or failed, but not the interrupted ones (rerun)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}  # failed by a stale heartbeat, run again
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    return sum(not t.user_attrs.get("interrupted") and t.number not in retried for t in done)


class _InterruptWithoutTraceback(logging.Filter):
    """Optuna logs a trial that raised with its traceback; for Ctrl-C or a kill (the trial is rerun when the search
    resumes) keep its one-line message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


def run_search_worker(job: SearchWorkerJob) -> WorkerResult:
    """Run trials of the study until `search.trials` have finished (over every worker) or the deadline passes."""
    cfg = job.plan.config
    study = open_study(job.plan, job.worker)
    tracker = Tracker(job.tracking_uri, experiment_id=job.experiment_id)
    ctx = TrialContext(job.plan, job.search_run_id, job.cache_dir, tracker, job.progress, job.worker)
    ran = 0

    def budget_spent(study, _trial) -> None:
        nonlocal ran
        ran += 1
        if (cfg.trials is not None and counted_trials(study) >= cfg.trials) or (
            job.deadline is not None and time.time() >= job.deadline
        ):
            study.stop()

    if cfg.trials is not None and counted_trials(study) >= cfg.trials:
        return WorkerResult(job.worker, 0)
    timeout = None if job.deadline is None else max(1.0, job.deadline - time.time())
    optimize_log, quiet = logging.getLogger("optuna.study._optimize"), _InterruptWithoutTraceback()
    optimize_log.addFilter(quiet)
    try:
        study.optimize(
            lambda trial: run_trial(trial, ctx),
            timeout=timeout,
            callbacks=[budget_spent],
            catch=(Exception,),  # a failing trial is recorded FAIL (its error in MLflow); the search goes on
            gc_after_trial=True,
        )
    finally:
        optimize_log.removeFilter(quiet)
    return WorkerResult(job.worker, ran)


def requeue_interrupted(study) -> int:
    """Enqueue again, with the same settings, each interrupted trial not already requeued; returns how many."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("resumes_trial") for t in trials}
    count = 0
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in requeued:
            study.enqueue_trial(trial.params, user_attrs={"resumes_trial": trial.number}, skip_if_exists=False)
            count += 1
    return count


# --- the search -------------------------------------------------------------------------------------------------


@dataclass
class SearchSummary:
    plan: SearchPlan
    run_id: str
    outcome: Any  # pipeline.search.outcome.SearchOutcome
    workers: list[WorkerResult] = field(default_factory=list)
    registered: tuple[str, int] | None = None  # (model name, version)
    seconds: float = 0.0


def run_search(
    recipe: Recipe,
    *,
    cache_dir: Path | None = None,
    tracker: Tracker | None = None,
    executor: str | Executor = "local",
    progress: bool = True,
    new: bool = False,
) -> SearchSummary:
    """Run (or resume) the search of `recipe` under one MLflow run; then register its best feasible model."""
    start = time.perf_counter()
    tracker = tracker or Tracker()
    cache_dir = Path(cache_dir or default_cache_dir())
    plan = plan_search(recipe, tracking_uri=tracker.uri, cache_dir=cache_dir, new=new)
    runner = get_executor(executor) if isinstance(executor, str) else executor
    cfg = plan.config
    workers = cfg.workers if runner.name == "ray" else 1
    if cfg.workers > 1 and runner.name != "ray":
        log.warning(
            "search.workers is %d, but the local executor runs one trial at a time (use executor: ray)", cfg.workers
        )
    study = open_study(plan)
    requeued = requeue_interrupted(study)
    for entry in cfg.start_with:  # a trial already run or waiting with these values is not added again
        study.enqueue_trial(dict(entry), skip_if_exists=True)
    previous = tracker.search_runs(plan.search_id)
    log.info(
        "search %s: %d orderings, %d fields sampled, %d of %s trials already counted%s; storage %s; executor %s",
        plan.search_id,
        len(plan.orderings),
        len(cfg.space),
        counted_trials(study),
        cfg.trials or "unlimited",
        f", {requeued} interrupted trial(s) requeued" if requeued else "",
        plan.storage,
        runner.name,
    )
    tags = {
        TAGS.search: plan.search_id,
        TAGS.run_type: RunType.SEARCH,
        TAGS.recipe: recipe.name,
        TAGS.pipeline_version: __version__,
    }
    resume_id = previous[0].run_id if previous else None
    with termination_as_interrupt(), tracker.run(f"search {recipe.name}", tags, resume_id=resume_id) as run_id:
        if resume_id is None:
            _log_plan(tracker, run_id, plan)
        deadline = time.time() + cfg.timeout_minutes * 60 if cfg.timeout_minutes else None
        jobs = [
            SearchWorkerJob(plan, i, run_id, cache_dir, tracker.uri, tracker.experiment_id, progress, deadline)
            for i in range(workers)
        ]
        results = list(runner.map(run_search_worker, jobs))
        for result in results:
            if result.error:
                log.error("search worker %d failed: %s", result.worker, result.error)
        outcome = outcome_of(open_study(plan), plan)
        registered = None
        if cfg.registry and outcome.best is not None:
            try:
                registered = register_best(tracker, plan, outcome)
            except Exception as err:  # the search's results stand; say why the registry has no entry
                log.warning(
                    "model registry: could not register trial %d: %s: %s",
                    outcome.best.number,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
        tracker.log_metrics(run_id, outcome.totals())
        tracker.set_tags(run_id, {"best_trial": outcome.best.number} if outcome.best is not None else {})
    return SearchSummary(plan, run_id, outcome, results, registered, time.perf_counter() - start)


def load_search_plan(tracker: Tracker, search_id: str | None = None) -> SearchPlan:
    """The plan of a search that has run (the latest when `search_id` is None), from its MLflow run: its recipe as
    logged and its study's storage."""
    import tempfile

    import yaml

    from pipeline.recipe import RecipeError, validate_recipe

    runs = tracker.search_runs(search_id)
    if not runs:
        raise ValueError(f"no search {search_id!r} in MLflow" if search_id else "no search in MLflow yet")
    run = runs[0]
    with tempfile.TemporaryDirectory() as tmp:
        text = tracker.download_artifact(run.run_id, "recipe.yaml", Path(tmp)).read_text()
    try:
        recipe = validate_recipe(yaml.safe_load(text))
    except RecipeError as err:
        raise ValueError(f"the recipe logged with search {run.tags[TAGS.search]} no longer validates: {err}") from None
    orderings = [">".join(o) for o in search_orderings(recipe)]
    stored = run.params.get("storage", "")
    storage = stored if stored and "***" not in stored else None  # a masked password: work the URL out again
    storage = storage or recipe.search.storage or default_storage(tracker.uri, default_cache_dir())
    return SearchPlan(recipe, run.tags[TAGS.search], orderings, storage)


def register_best(tracker: Tracker, plan: SearchPlan, outcome) -> tuple[str, int]:
    """Register the best feasible trial's model (its artifact and exported files) in the MLflow Model Registry."""
    best = outcome.best
    name = plan.config.registry_name or plan.recipe.name
    settings = best.settings
    tags = {
        "ordering": best.chain,
        "settings": json.dumps(settings, sort_keys=True),
        "search": plan.search_id,
        "trial": str(best.number),
        **{f"metric.{m}": f"{best.metrics[m]:.6g}" for m in plan.config.objectives},
        # the test split's figures, reported beside the validation metrics it was chosen on
        **{
            f"test.{t}": f"{best.metrics[t]:.6g}"
            for m in plan.config.objectives
            if (t := test_name(m)) != m and t in best.metrics
        },  # fmt: skip
        "constraints": "; ".join(plan.config.constraints) or "none",
    }
    deploy_dir = Path(best.deploy_dir or "")
    shipped = bool(best.deploy_dir) and deploy_dir.is_dir()
    if shipped:  # the exported files sit in the final stage's cache entry; ship them with the model
        tracker.log_artifacts(best.run_id, deploy_dir, "deploy")
    else:
        log.warning(
            "model registry: no exported files at %s (no deploy runtimes, or a cache this machine cannot "
            "see): registering the artifact alone",
            deploy_dir,
        )
    description = (
        f"Best feasible model of search {plan.search_id} (trial {best.number}, {best.chain}), chosen by "
        f"{plan.config.selection_metric} (validation split; the test split's figures are tags `test.*`). "
        "Folder: model/ (the pipeline artifact: pipeline.core.artifacts.load_artifact)"
        + (" and deploy/ (the exported ONNX / OpenVINO files)." if shipped else ".")
    )
    version, created = tracker.register_model(name, best.run_id, "", tags, description)
    log.info("model registry: %s version %d %s (alias `best`)", name, version, "registered" if created else "kept")
    return name, version


def _log_plan(tracker: Tracker, run_id: str, plan: SearchPlan) -> None:
    cfg = plan.config
    tracker.log_text(run_id, plan.recipe.to_yaml(), "recipe.yaml")
    tracker.log_params(
        run_id,
        {
            "orderings": len(plan.orderings),
            "ordering_list": ", ".join(plan.orderings),
            "space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in cfg.space.items()}),
            "objectives": json.dumps(cfg.objectives),
            "constraints": "; ".join(cfg.constraints) or "none",
            "trials": cfg.trials or "unlimited",
            "timeout_minutes": cfg.timeout_minutes or "none",
            "sampler": cfg.sampler,
            "workers": cfg.workers,
            "early_stop": cfg.early_stop.enabled,
            "storage": safe_url(plan.storage),
            "model": plan.recipe.model.name,
            "dataset": plan.recipe.data.dataset,
        },
    )


__all__ = ["SearchPlan", "SearchSummary", "plan_search", "run_search", "unreachable_constraint"]
