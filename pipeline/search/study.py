"""A search's Optuna study: its plan (what it samples from, its id), where the study is stored, opening it with its
sampler, reading a search back from MLflow, and the study's trial bookkeeping (which trials count, which to run
again after an interruption)."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.hashing import digest
from pipeline.recipe import Recipe
from pipeline.run.keys import evaluation_key
from pipeline.run.runner import default_cache_dir
from pipeline.search.config import SearchConfig
from pipeline.search.space import search_orderings
from pipeline.tracking import TAGS, Tracker

log = logging.getLogger("pipeline")

# A worker that stops beating for GRACE_S (killed, machine lost) has its trial failed and retried by the next worker.
HEARTBEAT_S, GRACE_S = 30, 180
# Search keys that say how long or where a search runs, not what it searches: changing them resumes the same study.
BUDGET_KEYS = {"trials", "timeout_minutes", "workers", "registry", "registry_name", "select", "confirm_seeds"}


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


def plan_search(recipe: Recipe, *, tracking_uri: str, cache_dir: Path, new: bool = False) -> SearchPlan:
    """The search of `recipe`. Its id is the recipe's name and a hash of everything that defines its trials, so the
    same search started again resumes; `new` gives it a fresh id (a time stamp suffix)."""
    if recipe.search is None:
        raise ValueError(f"recipe {recipe.name!r} has no `search:` block")
    orderings = [">".join(o) for o in search_orderings(recipe)]
    defining = recipe.to_dict()
    defining["search"] = {k: v for k, v in defining["search"].items() if k not in BUDGET_KEYS}
    if not recipe.search.pruner.enabled:  # searches from before pruners existed keep their id (and study)
        defining["search"].pop("pruner", None)
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


def search_storage(plan: SearchPlan, *, create: bool = True, heartbeat: bool = True):
    """The Optuna storage of the search's studies, with heartbeats for the search's own (a trial whose worker stops
    beating is failed and retried), without for the studies run by ask and tell (its pruner's fidelity studies, its
    confirmations). A missing SQLite file is a ValueError unless `create`."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from pipeline.search.storage import RetryingRDBStorage

    engine = {}
    if plan.storage.startswith("sqlite:///"):
        path = Path(plan.storage.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise ValueError(f"the study of search {plan.search_id} is not where it was stored: {path} is missing")
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # workers share the file: wait for the lock, do not fail
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not heartbeat:
            return RetryingRDBStorage(plan.storage, engine_kwargs=engine)
        return RetryingRDBStorage(
            plan.storage,
            engine_kwargs=engine,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )


def open_study(plan: SearchPlan, worker: int = 0, *, create: bool = True, storage=None):
    """The search's Optuna study (created on first use unless `create` is false: then a missing study is a
    ValueError), with the sampler of `search.sampler` seeded by the search's seed, the worker and the trials the
    study holds already, so a resumed search or a second worker does not propose the same trials again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the pipeline logs one line per trial itself
    storage = storage or search_storage(plan, create=create)
    if create:
        study = optuna.create_study(
            storage=storage, study_name=plan.search_id, directions=directions(plan.config), load_if_exists=True
        )
    else:
        try:
            study = optuna.load_study(study_name=plan.search_id, storage=storage)
        except KeyError:
            raise ValueError(f"no study {plan.search_id!r} in {safe_url(plan.storage)}") from None
    study.sampler = make_sampler(plan.config, worker, offset=len(study.get_trials(deepcopy=False)))
    return study


def directions(cfg: SearchConfig) -> list[str]:
    """Optuna's direction of each objective, in order (the search's study and its confirmations')."""
    return ["maximize" if d == "max" else "minimize" for d in cfg.objectives.values()]


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


def counted_trials(study) -> int:
    """Trials that count against `search.trials`: finished, pruned or failed, but not the interrupted ones (rerun)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}  # failed by a stale heartbeat, run again
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    return sum(not t.user_attrs.get("interrupted") and t.number not in retried for t in done)


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
