"""Issue #22 benchmark: what choosing on the test split would have done to a search that chose on validation.

A search records every trial's validation metrics (which it chose on) and test metrics (reported). This re-selects the
same trials as the code before validation splits did, on the test split: the objectives and constraints with each
validation accuracy replaced by its test counterpart (`onnxruntime.val_top1` -> `onnxruntime.top1`). It prints both
Pareto sets, both registered ("best") models, and the test top-1 each best has: the test-chosen best's is optimistic
by the selection, the validation-chosen best's is an honest estimate.

    .venv/bin/python bench/search_selection.py [SEARCH_ID]      # default: the latest search in MLflow

Reads the study and MLflow only; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.metrics import test_name  # noqa: E402
from pipeline.search.config import Constraint  # noqa: E402
from pipeline.search.outcome import summarize, trial_records  # noqa: E402
from pipeline.search.study import load_search_plan, open_study  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402


def _row(trial, metrics: list[str]) -> str:
    settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.settings.items())
    shown = ", ".join(f"{m} {trial.metrics.get(m, float('nan')):.4g}" for m in metrics)
    return f"trial {trial.number:>3} {trial.chain:<20} {settings:<26} {shown}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search_id", nargs="?", default=None)
    args = parser.parse_args(argv)
    tracker = Tracker()
    plan = load_search_plan(tracker, args.search_id)
    cfg = plan.config
    trials = trial_records(open_study(plan, create=False))
    selection = (cfg.selection_metric, cfg.objectives.get(cfg.selection_metric, "max"))
    on_val = summarize(plan.search_id, trials, cfg.objectives, cfg.parsed_constraints(), selection)
    # The same trials as the code before validation splits would have judged them: on the test split.
    test_objectives = {test_name(m): d for m, d in cfg.objectives.items()}
    test_constraints = [Constraint(test_name(c.metric), c.op, c.bound) for c in cfg.parsed_constraints()]
    retested = [  # a trial's feasibility is judged again, on the test split's figures
        replace(
            t, constraints={str(c): c.violation(t.metrics[c.metric]) for c in test_constraints if c.metric in t.metrics}
        )
        for t in trials
    ]
    on_test = summarize(plan.search_id, retested, test_objectives, test_constraints,
                        (test_name(selection[0]), selection[1]))  # fmt: skip
    metrics = list(dict.fromkeys([*cfg.objectives, *test_objectives]))
    complete = [t for t in trials if t.complete]
    print(f"search {plan.search_id}: {len(complete)} finished trials; chosen on {', '.join(cfg.objectives)}")
    for name, outcome in (("validation (what the search did)", on_val), ("test (the code before)", on_test)):
        print(f"\nPareto set chosen on {name}: {len(outcome.pareto)} models")
        for t in sorted(outcome.pareto, key=lambda t: -t.metrics[metrics[0]]):
            print("  " + _row(t, metrics))
    both = {t.number for t in on_val.pareto} & {t.number for t in on_test.pareto}
    print(f"\nin both Pareto sets: {len(both)}; only on validation's: {len(on_val.pareto) - len(both)}; "
          f"only on test's: {len(on_test.pareto) - len(both)}")  # fmt: skip
    chosen, test = selection[0], test_name(selection[0])
    for name, outcome in (("validation", on_val), ("test", on_test)):
        best = outcome.best
        if best is None:
            print(f"best chosen on {name}: none feasible")
            continue
        print(f"best chosen on {name}: {_row(best, [chosen, test])}")
    if on_val.best is not None and on_test.best is not None:
        gap = on_test.best.metrics[test] - on_val.best.metrics[test]
        print(f"\ntest {test} of the test-chosen best minus that of the validation-chosen best: {gap:+.2f} points "
              "(the optimism that choosing on the reported split adds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
