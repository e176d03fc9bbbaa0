"""Confirming a search's frontier (`search.confirm_seeds`): once its trials are done, every configuration of its
Pareto set (and its best trial's) runs again with more seeds, so the frontier and the registered model stand on seed
means rather than on each configuration's one, possibly lucky, seed.

Seed k (1..confirm_seeds) runs the trial's chain with the stages' seed `recipe.chain_seed + k`, the seeds a sweep's
`seeds:` would give it (seed_scope: stages): the baseline is shared, the spread is the stages' alone, and a sweep's
cached seeds are reused. Each confirmation is an MLflow chain run nested under the search's run (tags
`confirms_trial`, `seed`), and a finished trial of the study `<search id>:confirm` (its metrics in user attributes),
so an interrupted confirmation resumes where it stopped; what it trained is in the stage cache.
"""

from __future__ import annotations

import json
import logging

import optuna

from pipeline.core.metrics import metric_catalogue
from pipeline.search.outcome import Confirmation, SearchOutcome, confirmation_targets, outcome_of
from pipeline.search.study import SearchPlan, directions, open_study
from pipeline.search.trial import TrialContext, search_chain
from pipeline.tracking import TAGS

log = logging.getLogger("pipeline")


def confirm_study_name(search_id: str) -> str:
    return f"{search_id}:confirm"


def confirmation_seeds(plan: SearchPlan) -> list[int]:
    base = plan.recipe.chain_seed
    return [base + k for k in range(1, plan.config.confirm_seeds + 1)]


def read_confirmations(storage, plan: SearchPlan) -> list[Confirmation]:
    """The confirmations run so far (none when the study does not exist)."""
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=confirm_study_name(plan.search_id), storage=storage)
    except KeyError:
        return []
    return [
        Confirmation(
            int(t.user_attrs["confirms"]),
            int(t.user_attrs["seed"]),
            dict(t.user_attrs["metrics"]),
            t.user_attrs.get("run_id"),
        )  # fmt: skip
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]


def confirmed_outcome(plan: SearchPlan, storage, *, create: bool = True) -> SearchOutcome:
    """The search's outcome from its study, with its confirmed frontier when confirmations ran."""
    outcome = outcome_of(open_study(plan, create=create, storage=storage), plan)
    return outcome.with_confirmations(read_confirmations(storage, plan), plan.recipe.chain_seed)


def run_confirmations(ctx: TrialContext, outcome: SearchOutcome) -> list[Confirmation]:
    """Run each Pareto configuration (and the best trial's) with every confirmation seed it lacks; returns all."""
    plan = ctx.plan
    study = optuna.create_study(
        storage=ctx.storage,
        study_name=confirm_study_name(plan.search_id),
        directions=directions(plan.config),
        load_if_exists=True,
    )
    done = {(c.confirms, c.seed) for c in read_confirmations(ctx.storage, plan)}
    targets = confirmation_targets(outcome)
    todo = [(t, s) for t in targets for s in confirmation_seeds(plan) if (t.number, s) not in done]
    if todo:
        log.info("confirming the frontier: %d configuration(s) x %d more seed(s), %d chain(s) to run",
                 len(targets), plan.config.confirm_seeds, len(todo))  # fmt: skip
    catalogue = metric_catalogue(plan.recipe.deploy.runtimes)
    for index, (trial, seed) in enumerate(todo, 1):
        chain = search_chain(plan.recipe, trial.chain.split(">"), trial.settings)
        chain = chain.model_copy(update={"stage_seed": None if seed == chain.seed else seed})
        runner = ctx.runner(
            chain,
            {TAGS.confirms_trial: str(trial.number)},
            {"confirms_trial": trial.number, **{f"search.{k}": v for k, v in trial.settings.items()}},
            f"confirm trial {trial.number} (seed {seed}): {chain.ordering}",
        )
        log.info("confirmation %d/%d: trial %d (%s %s), seed %d", index, len(todo), trial.number, trial.chain,
                 json.dumps(trial.settings), seed)  # fmt: skip
        try:
            summary = runner.run()
        except Exception as err:  # the other seeds and configurations go on; this one is missing from the means
            log.error("confirmation of trial %d with seed %d failed (%s: %s); its mean leaves that seed out",
                      trial.number, seed, type(err).__name__, str(err).splitlines()[0] if str(err) else "")  # fmt: skip
            continue
        final = summary.results[-1].metrics
        metrics = {k: float(v) for k, v in final.items() if k in catalogue}
        if any(m not in metrics for m in plan.config.objectives):
            log.error("confirmation of trial %d with seed %d measured no %s; left out", trial.number, seed,
                      ", ".join(m for m in plan.config.objectives if m not in metrics))  # fmt: skip
            continue
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE,
                values=[metrics[m] for m in plan.config.objectives],
                user_attrs={"confirms": trial.number, "seed": seed, "metrics": metrics, "run_id": summary.run_id},
            )
        )
    return read_confirmations(ctx.storage, plan)


__all__ = ["confirm_study_name", "confirmation_seeds", "confirmed_outcome", "read_confirmations", "run_confirmations"]
