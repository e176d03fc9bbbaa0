"""Ordering sweeps: each ordering of a recipe's stages runs as its own chain; shared prefixes run once.

An ordering becomes a concrete chain recipe (`Recipe.as_chain`) run by the ordinary `Runner`, so caching,
evaluation and tracking are the same as for `run`. In MLflow a sweep is one top-level run (tags `sweep`,
`run_type=sweep`) with one nested run per ordering (tag `ordering`) and, below each, one run per stage.
Orderings that start with the same stages (same configs, same input) share cache keys, so the first one
to reach a prefix trains it and the others reuse it. A sweep's id is its recipe name plus a hash of its
chains: running the same sweep again resumes it (finished orderings are skipped, finished stages reused).
Orderings run through an executor (`pipeline.run.executors`): `local` runs them one after another in this
process, `ray` as Ray tasks; orderings running at once wait on the cache's per-key lock for a shared prefix.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.core.hashing import digest
from pipeline.core.training import TrainConfig
from pipeline.recipe import Recipe, StageSpec
from pipeline.run.executors import Executor, get_executor
from pipeline.run.keys import data_fingerprint, evaluation_key, plan_chain
from pipeline.run.runner import Runner, default_cache_dir, termination_as_interrupt, training_epochs
from pipeline.sweep.orderings import sweep_orderings
from pipeline.tracking import TAGS, RunType, Tracker, faults

log = logging.getLogger("pipeline")

FINAL_METRICS = ("val_top1", "top1", "artifact_bytes", "latency_ms_p50")
RUNTIME_FINAL_METRICS = ("val_top1", "top1", "latency_ms_p50")  # also kept per runtime: `onnxruntime.top1`, …


@dataclass(frozen=True)
class SweepPlan:
    """The chains a sweep runs (one per ordering), the orderings it skipped and why, and its id."""

    recipe: Recipe
    sweep_id: str
    chains: list[Recipe]
    skipped: list[tuple[tuple[str, ...], str]]
    fingerprint: str = ""  # of the data every chain trains on (read once for the plan)

    @property
    def stage_slots(self) -> int:
        """Stage runs the orderings hold in all, the baseline of each included."""
        return sum(len(c.stages) + 1 for c in self.chains)

    @property
    def distinct_stages(self) -> int:
        """Distinct stage outputs (cache keys): what a sweep from an empty cache trains, the baseline included."""
        return len({stage.key for chain in self.chains for stage in plan_chain(chain, self.fingerprint or None)})


def plan_sweep(recipe: Recipe, *, new: bool = False) -> SweepPlan:
    """Expand a recipe's orderings into chains. Without `orderings:` every permutation of its stages is swept.

    `new` gives the sweep a fresh id (a time stamp suffix), so it is tracked apart from an earlier identical one."""
    orderings, skipped = sweep_orderings(recipe)
    if not orderings:
        reasons = "; ".join(reason for _, reason in skipped) or "no stages"
        raise ValueError(f"recipe {recipe.name!r}: no ordering can run ({reasons})")
    seeds = recipe.seed_list() if recipe.seeds is not None else [None]
    chains = [recipe.as_chain(ordering, seed=seed) for ordering in orderings for seed in seeds]
    if recipe.control is not False:  # unset: every sweep gets its equal-training control
        chains += control_chains(recipe, chains, seeds)
    if recipe.budget is not None:
        for chain in chains:
            if (epochs := training_epochs(chain)) != recipe.budget.epochs:
                log.warning(
                    "budget: %s trains %d epochs, not %d (a stage trains whole epochs per step)",
                    chain.ordering,
                    epochs,
                    recipe.budget.epochs,
                )
    content = digest({"chains": [c.to_dict() for c in chains], "evaluation": evaluation_key(recipe)})[:8]
    sweep_id = f"{recipe.name}-{content}" + (time.strftime("-%Y%m%d-%H%M%S") if new else "")
    return SweepPlan(recipe, sweep_id, chains, skipped, data_fingerprint(recipe))


def control_chain(recipe: Recipe, epochs: int, first_stage: StageSpec | None, seed: int | None = None) -> Recipe:
    """The equal-training control of chains that train `epochs` epochs: the baseline continued by a `train`
    stage with `first_stage`'s optimizer, LR and schedule (the baseline's when it has none)."""
    source = first_stage.config if first_stage and isinstance(first_stage.config, TrainConfig) else recipe.baseline
    fields = {k: v for k, v in source.model_dump().items() if k in TrainConfig.model_fields}
    control = StageSpec("train", TrainConfig.model_validate({**fields, "epochs": epochs}))
    chain = recipe.as_chain([], seed=seed)
    return chain.model_copy(update={"stages": [control], "control_epochs": epochs})


def control_chains(recipe: Recipe, chains: list[Recipe], seeds: list[int | None]) -> list[Recipe]:
    """One equal-training control per distinct number of epochs the chains train (and per seed): the baseline
    continued in fp32 for as long, with the first training stage's optimizer and schedule of a chain that long."""
    first_by_epochs: dict[int, object] = {}
    for chain in chains:
        epochs = training_epochs(chain)
        if epochs > 0 and epochs not in first_by_epochs:
            trains = [s for s in chain.stage_specs() if getattr(s.config, "total_epochs", lambda: 0)() > 0]
            first_by_epochs[epochs] = trains[0] if trains else None
    return [control_chain(recipe, e, first, seed) for e, first in sorted(first_by_epochs.items()) for seed in seeds]


# --- running one ordering (what an executor runs) --------------------------------------------------


@dataclass(frozen=True)
class OrderingJob:
    """Everything one ordering needs, plain enough to send to another process or machine."""

    chain: Recipe
    sweep_id: str
    sweep_run_id: str
    cache_dir: Path
    tracking_uri: str
    experiment_id: str
    progress: bool
    label: str = ""  # the chain's name in the sweep (`chain_label`); the ordering when empty
    invocation: str = ""  # this invocation of the sweep (a retried job closes its own dead attempt's runs only)

    @property
    def name(self) -> str:
        return self.label or self.chain.ordering

    def failed(self, error: str) -> OrderingResult:
        """The result of this job when its worker died before it could report."""
        return OrderingResult(
            self.name, "FAILED", error=error, seed=self.chain.chain_seed, chain_ordering=self.chain.ordering
        )


@dataclass
class OrderingResult:
    ordering: str  # the chain's label: its ordering, with its seed when the sweep repeats chains per seed
    status: str  # FINISHED or FAILED
    run_id: str | None = None
    executed: list[str] = field(default_factory=list)  # cache keys of stages this ordering trained
    reused: int = 0
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    seed: int | None = None
    chain_ordering: str = ""  # the ordering alone (`ordering` may add the seed)


def run_ordering(job: OrderingJob) -> OrderingResult:
    """Run one ordering's chain under the sweep's run. A failing stage fails this ordering, not the sweep."""
    start = time.perf_counter()
    tracker = Tracker(job.tracking_uri, experiment_id=job.experiment_id)
    # A retried attempt (Ray runs a task again when its worker died): close the runs the dead attempt left RUNNING.
    # Attempts of one chain in one invocation never overlap: a RUNNING run of it here is a dead attempt's.
    died = "its worker died; the chain was run again"
    retried = tracker.fail_open_ordering_runs(
        job.sweep_id, job.chain.ordering, died, seed=job.chain.chain_seed, invocation=job.invocation
    )
    if retried:
        log.warning("ordering %s: closed %d run(s) its earlier, dead attempt left RUNNING", job.name, retried)
    tags = {TAGS.sweep: job.sweep_id, TAGS.sweep_invocation: job.invocation}
    runner = Runner(
        job.chain,
        cache_dir=job.cache_dir,
        tracker=tracker,
        progress=job.progress,
        parent_run_id=job.sweep_run_id,
        tags=tags,
    )
    try:
        summary = runner.run()
    except Exception as err:  # the Runner marked its MLflow runs FAILED; the other orderings go on
        if faults.away(err, job.tracking_uri):
            raise  # unless the tracking server is away: each of them would wait through the same retries
        log.error("ordering %s failed: %s: %s", job.name, type(err).__name__, err)
        return OrderingResult(job.name, "FAILED", seconds=time.perf_counter() - start,
                              error=f"{type(err).__name__}: {err}", seed=job.chain.chain_seed,
                              chain_ordering=job.chain.ordering)  # fmt: skip
    return OrderingResult(
        job.name,
        "FINISHED",
        run_id=summary.run_id,
        executed=[r.key for r in summary.results if not r.cached],
        reused=sum(r.cached for r in summary.results),
        final={
            k: v
            for k, v in summary.results[-1].metrics.items()
            if k in FINAL_METRICS or k.rpartition(".")[2] in RUNTIME_FINAL_METRICS
        },  # fmt: skip
        seconds=time.perf_counter() - start,
        seed=job.chain.chain_seed,
        chain_ordering=job.chain.ordering,
    )


# --- the sweep ---------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    plan: SweepPlan
    run_id: str
    results: list[OrderingResult]
    already_done: list[str]
    executed: int  # stage runs trained by this invocation
    reused: int  # stage runs this invocation took from the cache
    seconds: float

    @property
    def failed(self) -> list[OrderingResult]:
        """The orderings of this invocation that did not finish."""
        return [r for r in self.results if r.status != "FINISHED"]


def run_sweep(
    recipe: Recipe,
    *,
    cache_dir: Path | None = None,
    tracker: Tracker | None = None,
    executor: str | Executor = "local",
    progress: bool = True,
    new: bool = False,
) -> SweepSummary:
    """Run (or resume) every ordering of `recipe` under one MLflow sweep run; returns what ran and what was reused."""
    start = time.perf_counter()
    plan = plan_sweep(recipe, new=new)
    runner = get_executor(executor) if isinstance(executor, str) else executor
    tracker = tracker or Tracker()
    for ordering, reason in plan.skipped:
        log.warning("skipping ordering %s: %s", ">".join(ordering), reason)
    previous = tracker.sweep_runs(plan.sweep_id)
    done = _finished_orderings(tracker, plan.sweep_id, plan.recipe) if previous else {}
    todo = [chain for chain in plan.chains if chain_label(chain, plan.recipe) not in done]
    log.info(
        "sweep %s: %d orderings (%d already finished), %d distinct stage outputs of %d stage runs; executor %s",
        plan.sweep_id,
        len(plan.chains),
        len(done),
        plan.distinct_stages,
        plan.stage_slots,
        runner.name,
    )
    tags = {
        TAGS.sweep: plan.sweep_id,
        TAGS.run_type: RunType.SWEEP,
        TAGS.recipe: recipe.name,
        TAGS.pipeline_version: __version__,
    }
    resume_id = previous[0].run_id if previous else None
    with termination_as_interrupt(), tracker.run(f"sweep {recipe.name}", tags, resume_id=resume_id) as sweep_run_id:
        if resume_id is None:
            _log_plan(tracker, sweep_run_id, plan, runner.name)
        where = (Path(cache_dir or default_cache_dir()), tracker.uri, tracker.experiment_id)
        invocation = uuid.uuid4().hex[:12]
        jobs = [OrderingJob(chain, plan.sweep_id, sweep_run_id, *where, progress, chain_label(chain, plan.recipe),
                            invocation) for chain in todo]  # fmt: skip
        results = _run_jobs(runner, jobs)
        for result in results:
            if result.run_id is None:  # its worker died: close the runs it left RUNNING
                tracker.fail_open_ordering_runs(plan.sweep_id, result.chain_ordering, result.error or "worker died",
                                                seed=result.seed, invocation=invocation)  # fmt: skip
        summary = _summarize(plan, sweep_run_id, results, list(done), time.perf_counter() - start)
        _log_totals(tracker, sweep_run_id, summary)
    return summary


def _run_jobs(runner: Executor, jobs: list[OrderingJob]) -> list[OrderingResult]:
    results = []
    for i, result in enumerate(runner.map(run_ordering, jobs), 1):
        results.append(result)
        log.info("sweep: %d/%d orderings done (%s: %s)", i, len(jobs), result.ordering, result.status)
    return results


def chain_label(chain: Recipe, sweep: Recipe) -> str:
    """How a sweep names one of its chains: the ordering, plus its seed when the sweep repeats chains per seed."""
    return chain.ordering if sweep.seeds is None else f"{chain.ordering} (seed {chain.chain_seed})"


def _finished_orderings(tracker: Tracker, sweep_id: str, sweep: Recipe) -> dict[str, str]:
    """chain label -> run id of its FINISHED chain run in this sweep (from an earlier, interrupted invocation)."""
    runs = tracker.chain_runs(sweep_id, status="FINISHED")
    labels = {}
    for run in reversed(runs):
        seed = run.tags.get(TAGS.seed, str(sweep.seed))  # runs logged before seeds existed ran with `seed`
        ordering = run.tags[TAGS.ordering]
        labels[ordering if sweep.seeds is None else f"{ordering} (seed {seed})"] = run.run_id
    return labels


def _summarize(plan: SweepPlan, run_id: str, results: list[OrderingResult], done: list[str], seconds: float):
    # Executed = distinct stage outputs trained; with a parallel executor two orderings could race on one prefix.
    executed = len({key for r in results for key in r.executed})
    slots = sum(len(r.executed) + r.reused for r in results)
    return SweepSummary(plan, run_id, results, done, executed, slots - executed, seconds)


def _log_plan(tracker: Tracker, run_id: str, plan: SweepPlan, executor: str) -> None:
    tracker.log_text(run_id, plan.recipe.to_yaml(), "recipe.yaml")
    tracker.log_params(
        run_id,
        {
            "orderings": len(plan.chains),
            "ordering_list": ", ".join(dict.fromkeys(c.ordering for c in plan.chains)),
            "seeds": ", ".join(str(seed) for seed in plan.recipe.seed_list()),
            "seed_scope": plan.recipe.seed_scope if plan.recipe.seeds is not None else "none",
            "controls": ", ".join(c.ordering for c in plan.chains if c.control_epochs is not None) or "none",
            "skipped": "; ".join(f"{'>'.join(o)}: {why}" for o, why in plan.skipped) or "none",
            "include_singles": plan.recipe.include_singles,
            "budget": json.dumps(plan.recipe.budget.model_dump(mode="json")) if plan.recipe.budget else "none",
            "executor": executor,
            "model": plan.recipe.model.name,
            "dataset": plan.recipe.data.dataset,
        },
    )


def _log_totals(tracker: Tracker, run_id: str, summary: SweepSummary) -> None:
    """Counts over every invocation of this sweep, read back from its runs, so a resumed sweep adds up:
    executed = distinct stage outputs trained into the cache, reused = stage runs of finished orderings that
    came from the cache."""
    stages = tracker.stage_runs(summary.plan.sweep_id)
    finished = set(_finished_orderings(tracker, summary.plan.sweep_id, summary.plan.recipe).values())
    trained = {run.tags[TAGS.cache_key] for run in stages if run.flag(TAGS.trained)}
    reused = sum(run.flag(TAGS.cached) and run.parent_id in finished for run in stages)
    tracker.log_metrics(
        run_id,
        {
            "stage_runs_executed": len(trained),
            "stage_runs_reused": reused,
            "orderings_finished": len(finished),
            "orderings_failed": len(summary.failed),
            "orderings_skipped": len(summary.plan.skipped),
            "sweep_seconds": tracker.latest_metrics(run_id).get("sweep_seconds", 0) + summary.seconds,
        },
    )


__all__ = ["SweepPlan", "SweepSummary", "plan_sweep", "run_sweep"]
