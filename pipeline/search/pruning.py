"""Stopping a search's trials that are behind (`search.pruner`), with Optuna's own pruners.

Optuna's pruners read a single-objective study (`Trial.report` refuses a multi-objective one, and a search has
several objectives). So each group of peer trials (`search.pruner.peers`: by default those of one ordering) has a
*fidelity study* of its own beside the search's study, named `<search id>:fidelity:<group>`: one trial there per
search trial, holding the trial's validation top-1 after each epoch it trained (`epoch_val_top1`, on a fixed part of
the validation split), at step = the chain's epochs so far (the baseline's left out). After each report the pruner
of `search.pruner.method` decides; a trial it stops raises `PrunedChain`, which the search tells its study as
PRUNED.

A stage reused from the cache reports the epochs its record holds, so a cached prefix that is behind is stopped
before the next stage trains. The fidelity trial ends with its search trial: COMPLETE (its last report is its
value), PRUNED (pruned, or ended early by a constraint) or FAIL (failed or interrupted; an interrupted trial runs
again as a new search trial with a new fidelity trial).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.core.hashing import digest
from pipeline.core.metrics import EPOCH_VAL_METRIC
from pipeline.search.config import ORDERING_PARAM, PrunerConfig
from pipeline.tracking import TAGS

log = logging.getLogger("pipeline")


class PrunedChain(optuna.TrialPruned):
    """Raised after an epoch to stop a trial its pruner found behind; its chain's MLflow runs end KILLED, the chain's
    run tagged `pruned` with the reason."""

    run_status = "KILLED"

    @property
    def run_tags(self) -> dict[str, str]:
        return {TAGS.pruned: str(self)}


def make_pruner(cfg: PrunerConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner of `cfg.method` (not `none`); `max_epochs`: the longest chain's epochs (hyperband)."""
    if cfg.method == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs)
    if cfg.method == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_epochs, reduction_factor=cfg.reduction_factor, min_early_stopping_rate=0
        )
    if cfg.method == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_epochs,
            max_resource=max(cfg.max_epochs or max_epochs, cfg.min_epochs),
            reduction_factor=cfg.reduction_factor,
        )
    raise ValueError(f"no pruner for method {cfg.method!r}")


def peer_group(cfg: PrunerConfig, params: dict[str, Any]) -> str:
    """The name of a trial's peer group: the values of `cfg.peers` in its parameters ('all' when compared with
    every trial). A field its ordering lacks (no such stage) is part of the group as absent."""
    keys = cfg.peer_keys()
    if not keys:
        return "all"
    values = {k: params.get(k) for k in keys}
    readable = str(values.get(ORDERING_PARAM, "")) if keys == [ORDERING_PARAM] else ""
    return readable or digest(values)[:10]


def fidelity_study_name(search_id: str, group: str) -> str:
    return f"{search_id}:fidelity:{group}"


@dataclass
class FidelityReporter:
    """One search trial's reports to its fidelity study: an `EpochObserver` for the runner (`__call__`), then
    `finish` with how the trial ended. `offsets[i]`: the chain's epochs before stage i + 1 (the baseline is stage 0
    and reports nothing)."""

    study: optuna.Study
    trial: optuna.Trial
    offsets: list[int]
    total_epochs: int
    reported: dict[int, float] = field(default_factory=dict)  # step -> value
    trained: int = 0  # epochs this trial trained itself (the others came from the cache)
    reused: int = 0

    def __call__(self, stage_index: int, epoch: int, stats: dict[str, float], replayed: bool = False) -> None:
        if stage_index == 0 or stage_index > len(self.offsets):
            return
        self.reused, self.trained = self.reused + replayed, self.trained + (not replayed)
        value = stats.get(EPOCH_VAL_METRIC)
        step = self.offsets[stage_index - 1] + epoch + 1
        if value is None or step in self.reported:  # a record from before pruning existed; never a step twice
            return
        self.trial.report(float(value), step)
        self.reported[step] = float(value)
        if step < self.total_epochs and self.trial.should_prune():  # at the last epoch, stopping saves nothing
            raise PrunedChain(
                f"pruned after {step} of {self.total_epochs} epochs: validation top-1 {value:.2f} % (on the part "
                "scored each epoch) is behind its peers"
            )

    @property
    def last_step(self) -> int:
        return max(self.reported, default=0)

    def accounting(self) -> dict[str, int]:
        """A pruned trial's epochs: trained, reused from the cache, and saved by stopping it (`epochs_pruned`)."""
        done = self.trained + self.reused
        return {"epochs_trained": self.trained, "epochs_reused": self.reused,
                "epochs_pruned": max(self.total_epochs - done, 0)}  # fmt: skip

    def finish(self, state: TrialState) -> None:
        """End the fidelity trial; a COMPLETE one takes its last report as its value (none reported: FAIL)."""
        values = None
        if state == TrialState.COMPLETE:
            if not self.reported:
                state = TrialState.FAIL
            else:
                values = self.reported[self.last_step]
        try:
            self.study.tell(self.trial, values, state=state)
        except Exception as err:  # the search trial's outcome stands; its fidelity record is secondary
            log.warning("fidelity study: could not end trial %d: %s", self.trial.number, err)


def open_fidelity_study(storage, search_id: str, group: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The fidelity study of one peer group (created on first use), in the search study's storage."""
    return optuna.create_study(
        storage=storage,
        study_name=fidelity_study_name(search_id, group),
        direction="maximize",
        pruner=pruner,
        load_if_exists=True,
    )


def fail_unfinished(storage, search_id: str, running: set[int]) -> int:
    """Fail every fidelity trial still RUNNING whose search trial is not in `running` (it was interrupted, or its
    worker died); returns how many."""
    prefix = fidelity_study_name(search_id, "")
    failed = 0
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not summary.study_name.startswith(prefix):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("search_trial") not in running:
                study.tell(trial.number, state=TrialState.FAIL)
                failed += 1
    return failed


__all__ = [
    "FidelityReporter",
    "PrunedChain",
    "fail_unfinished",
    "fidelity_study_name",
    "make_pruner",
    "open_fidelity_study",
    "peer_group",
]
