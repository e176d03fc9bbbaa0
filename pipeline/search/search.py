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

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.recipe import Recipe
from pipeline.run.executors import Executor, get_executor
from pipeline.run.runner import default_cache_dir, termination_as_interrupt
from pipeline.search.confirm import confirmed_outcome, run_confirmations
from pipeline.search.outcome import outcome_of
from pipeline.search.pruning import fail_unfinished
from pipeline.search.registry import log_plan, register_best
from pipeline.search.study import (
    SearchPlan,
    counted_trials,
    open_study,
    plan_search,
    requeue_interrupted,
    safe_url,
    search_storage,
)
from pipeline.search.trial import TrialContext, run_trial
from pipeline.tracking import TAGS, RunType, Tracker

log = logging.getLogger("pipeline")


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


class _InterruptWithoutTraceback(logging.Filter):
    """Optuna logs a trial that raised with its traceback; for Ctrl-C or a kill (the trial is rerun when the search
    resumes) keep its one-line message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


def run_search_worker(job: SearchWorkerJob) -> WorkerResult:
    """Run trials of the study until `search.trials` have finished (over every worker) or the deadline passes."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    cfg = job.plan.config
    storage = search_storage(job.plan)
    study = open_study(job.plan, job.worker, storage=storage)
    tracker = Tracker(job.tracking_uri, experiment_id=job.experiment_id)
    plain = search_storage(job.plan, heartbeat=False)  # the fidelity studies, run by ask and tell
    ctx = TrialContext(job.plan, job.search_run_id, job.cache_dir, tracker, job.progress, job.worker, plain)
    ran = 0

    def trials_spent(study) -> bool:
        """The budget counts the trials other workers are running: without them, two workers finishing together
        would each start one more than `search.trials` allows."""
        if cfg.trials is None:
            return False
        fail_stale_trials(study)  # a dead worker's trial is failed (and retried), not counted as running
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        return counted_trials(study) + running >= cfg.trials

    def budget_spent(study, _trial) -> None:
        nonlocal ran
        ran += 1
        if trials_spent(study) or (job.deadline is not None and time.time() >= job.deadline):
            study.stop()

    if trials_spent(study):
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


# --- the search -------------------------------------------------------------------------------------------------


def _prepare_study(plan: SearchPlan, executor: str) -> None:
    """Open (or create) the study, requeue its interrupted trials and enqueue `start_with`; say where it stands."""
    from optuna.trial import TrialState

    cfg = plan.config
    storage = search_storage(plan)
    study = open_study(plan, storage=storage)
    requeued = requeue_interrupted(study)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    fail_unfinished(search_storage(plan, heartbeat=False), plan.search_id, running)  # of the interrupted trials
    for entry in cfg.start_with:  # a trial already run or waiting with these values is not added again
        study.enqueue_trial(dict(entry), skip_if_exists=True)
    log.info(
        "search %s: %d orderings, %d fields sampled, %d of %s trials already counted%s; storage %s; executor %s",
        plan.search_id, len(plan.orderings), len(cfg.space), counted_trials(study), cfg.trials or "unlimited",
        f", {requeued} interrupted trial(s) requeued" if requeued else "", safe_url(plan.storage), executor,
    )  # fmt: skip


@dataclass
class SearchSummary:
    plan: SearchPlan
    run_id: str
    outcome: Any  # pipeline.search.outcome.SearchOutcome
    workers: list[WorkerResult] = field(default_factory=list)
    registered: tuple[str, int] | None = None  # (model name, version)
    seconds: float = 0.0


def _conclude(plan: SearchPlan, ctx: TrialContext):
    """After the trials: the outcome, confirmed with more seeds (`search.confirm_seeds`), the chosen model
    registered, the counts logged on the search's run. Returns (outcome, registered)."""
    tracker, run_id = ctx.tracker, ctx.search_run_id
    storage = search_storage(plan, heartbeat=False)
    outcome = outcome_of(open_study(plan, storage=storage), plan)
    if plan.config.confirm_seeds and outcome.pareto:
        run_confirmations(replace(ctx, storage=storage), outcome)
        outcome = confirmed_outcome(plan, storage)
    registered = None
    if plan.config.registry and outcome.chosen is not None:
        try:
            registered = register_best(tracker, plan, outcome)
        except Exception as err:  # the search's results stand; say why the registry has no entry
            first_line = str(err).splitlines()[0] if str(err) else ""
            log.warning("model registry: could not register trial %d: %s: %s", outcome.chosen.number,
                        type(err).__name__, first_line)  # fmt: skip
    tracker.log_metrics(run_id, outcome.totals())
    tracker.set_tags(run_id, {"best_trial": outcome.chosen.number} if outcome.chosen is not None else {})
    if registered is not None:
        tracker.set_tags(run_id, {TAGS.registered_model: f"{registered[0]} version {registered[1]}"})
    return outcome, registered


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
    _prepare_study(plan, runner.name)
    previous = tracker.search_runs(plan.search_id)
    tags = {
        TAGS.search: plan.search_id,
        TAGS.run_type: RunType.SEARCH,
        TAGS.recipe: recipe.name,
        TAGS.pipeline_version: __version__,
    }
    resume_id = previous[0].run_id if previous else None
    with termination_as_interrupt(), tracker.run(f"search {recipe.name}", tags, resume_id=resume_id) as run_id:
        if resume_id is None:
            log_plan(tracker, run_id, plan)
        deadline = time.time() + cfg.timeout_minutes * 60 if cfg.timeout_minutes else None
        jobs = [
            SearchWorkerJob(plan, i, run_id, cache_dir, tracker.uri, tracker.experiment_id, progress, deadline)
            for i in range(workers)
        ]
        results = list(runner.map(run_search_worker, jobs))
        for result in results:
            if result.error:
                log.error("search worker %d failed: %s", result.worker, result.error)
        outcome, registered = _conclude(plan, TrialContext(plan, run_id, cache_dir, tracker, progress))
    return SearchSummary(plan, run_id, outcome, results, registered, time.perf_counter() - start)


__all__ = ["SearchSummary", "run_search"]
