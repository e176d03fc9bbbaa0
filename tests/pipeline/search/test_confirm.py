"""Confirmed frontiers (`search.confirm_seeds`), on hand-made trials: each Pareto configuration becomes one point with
its seed mean and interval; the frontier and the registered model follow the means, so a configuration that was
lucky on its one seed loses to a steadier one, and one feasible only by luck drops out. (The confirmation runs
themselves: tests/pipeline/search/test_pruning.py's tiny search.)"""

from __future__ import annotations

import pytest

from pipeline.search.config import Constraint
from pipeline.search.outcome import Confirmation, TrialRecord, summarize


def _trial(number: int, top1: float, size: float, ratio: float) -> TrialRecord:
    return TrialRecord(number, "COMPLETE", "prune", {"ordering": "prune", "prune.pruning_ratio": ratio},
                       {"val_top1": top1, "artifact_bytes": size}, {}, None, f"run{number}", None, {}, 1.0,
                       {"val_top1": 90.0, "artifact_bytes": 200.0})  # fmt: skip


def _seed(trial: int, seed: int, top1: float, size: float) -> Confirmation:
    return Confirmation(trial, seed, {"val_top1": top1, "artifact_bytes": size}, f"confirm{trial}-{seed}")


def test_the_frontier_and_the_registered_model_follow_the_seed_means():
    objectives = {"val_top1": "max", "artifact_bytes": "min"}
    trials = [
        _trial(0, 80.0, 100, 0.3),  # lucky: its other seeds give 78 and 77.5
        _trial(1, 79.0, 90, 0.4),  # steady
        _trial(2, 77.5, 50, 0.7),  # feasible on its one seed, not on average
        _trial(3, 60.0, 95, 0.5),  # dominated: not confirmed
    ]
    constraints = [Constraint.parse("val_top1 >= 77")]
    outcome = summarize("s", trials, objectives, constraints, ("val_top1", "max"))
    assert [t.number for t in outcome.pareto] == [0, 1, 2] and outcome.best.number == 0
    assert outcome.confirmed is None and outcome.chosen.number == 0  # no confirmation: the best single run

    confirmations = [_seed(0, 1, 78.0, 100), _seed(0, 2, 77.5, 100), _seed(1, 1, 79.0, 90), _seed(1, 2, 78.5, 90),
                     _seed(2, 1, 70.0, 50), _seed(2, 2, 71.0, 50)]  # fmt: skip
    confirmed = outcome.with_confirmations(confirmations, trial_seed=0)
    points = {p.trial.number: p for p in confirmed.confirmed}
    assert set(points) == {0, 1, 2}  # one point per Pareto configuration, each over its 3 seeds
    assert points[0].seeds == [0, 1, 2] and points[0].values["val_top1"] == [80.0, 78.0, 77.5]
    ci = points[0].interval("val_top1")
    assert ci.mean == pytest.approx(78.5) and ci.low < ci.mean < ci.high and ci.n == 3
    assert not points[2].feasible and points[0].feasible  # 72.8 on average is under the bound
    # On the means the steady configuration (78.8 %, 90 bytes) dominates the lucky one (78.5 %, 100 bytes).
    assert [p.trial.number for p in confirmed.confirmed_front] == [1]
    assert confirmed.confirmed_best.trial.number == 1 and confirmed.chosen.number == 1
    totals = confirmed.totals()
    assert totals["confirmed_pareto_size"] == 1 and totals["confirmed_hypervolume"] > 0


def test_nothing_is_chosen_when_no_configuration_meets_the_bounds_on_average():
    outcome = summarize("s", [_trial(0, 78.0, 50, 0.5)], {"val_top1": "max", "artifact_bytes": "min"},
                        [Constraint.parse("val_top1 >= 77")], ("val_top1", "max"))  # fmt: skip
    confirmed = outcome.with_confirmations([_seed(0, 1, 70.0, 50)], trial_seed=0)
    assert outcome.chosen.number == 0 and confirmed.confirmed_front == [] and confirmed.chosen is None
    assert outcome.with_confirmations([], trial_seed=0) is outcome  # nothing confirmed yet: as it was


def test_against_a_sweep_both_sides_are_seed_means():
    import pandas as pd

    from pipeline.reporting.search import seed_means
    from pipeline.search.outcome import compare_with_sweep

    sweep = pd.DataFrame(
        {"val_top1": [90.0, 80.0, 76.0, 70.0], "artifact_bytes": [200.0, 100.0, 100.0, 60.0]},
        index=["baseline [aaaaaa]", "baseline>prune [bbbbbb]", "baseline>prune [cccccc]", "baseline>qat [dddddd]"],
    )
    means = seed_means(sweep)
    assert means.loc["baseline>prune"].tolist() == [78.0, 100.0] and len(means) == 3  # two seeds of one path
    outcome = summarize("s", [_trial(0, 80.0, 100, 0.3)], {"val_top1": "max", "artifact_bytes": "min"}, [],
                        ("val_top1", "max"))  # fmt: skip
    confirmed = outcome.with_confirmations([_seed(0, 1, 74.0, 100)], trial_seed=0)  # mean 77: below the sweep's 78
    single = compare_with_sweep(outcome, "sw", means)
    paired = compare_with_sweep(confirmed.on_means(), "sw", means, means=True)
    assert "baseline>prune" in single.sweep_dominated  # the lucky single seed beats the sweep's mean...
    assert "baseline>prune" not in paired.sweep_dominated and paired.means  # ...its own mean does not
