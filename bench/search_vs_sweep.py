"""A search's frontier against a sweep's, trial by trial: the hypervolume of the search's feasible Pareto set after
its first N trials, on the geometry of the full comparison (the report's `--against` section measures only the end),
when it first exceeds the sweep's, and which sweep models no search point dominates or equals (with their metrics,
to judge whether the margins are inside the noise).

    make bench-search [search=ID] [against=SWEEP_ID]       # default: the worked example of BENCHMARKS.md
    .venv/bin/python bench/search_vs_sweep.py SEARCH_ID SWEEP_ID [--at 5 8 20 50]

"The first N trials" are the first N finished ones (interrupted and failed trials are not counted).

Reads the study and MLflow only; trains nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.reporting.sweep_report import sweep_models  # noqa: E402
from pipeline.search.outcome import compare_with_sweep, objective_values, outcome_of, summarize  # noqa: E402
from pipeline.search.study import load_search_plan, open_study  # noqa: E402
from pipeline.tracking import Tracker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search_id")
    parser.add_argument("sweep_id")
    parser.add_argument("--at", type=int, nargs="*", default=[5, 8, 10, 20, 30, 50, 80], help="trial counts to show")
    args = parser.parse_args(argv)

    tracker = Tracker()
    plan = load_search_plan(tracker, args.search_id)
    outcome = outcome_of(open_study(plan, create=False), plan)
    objectives = outcome.objectives
    needed = [*objectives, *(c.metric for c in outcome.constraints)]
    full = compare_with_sweep(outcome, args.sweep_id, sweep_models(tracker, args.sweep_id, needed))

    def ratio(volume: float) -> str:
        return f"{volume / full.sweep_volume:.3f}x" if full.sweep_volume > 0 else "n/a (the sweep's is 0)"

    print(
        f"search {full.search_volume:.4f}, sweep {full.sweep_volume:.4f}: {ratio(full.search_volume)} "
        f"({len(full.sweep_points)} sweep models within the constraints)"
    )

    standing = full.sweep_standing
    print(f"\n{len(standing)} of {len(full.sweep_points)} sweep models no search Pareto point dominates or equals:")
    if standing:
        print(full.sweep_points.loc[standing, list(objectives)].to_string())

    print("\nfirst N finished trials: hypervolume, ratio to the sweep's, trial time so far")
    finished = [t for t in outcome.trials if t.complete]
    passed, seconds = None, 0.0
    for n, trial in enumerate(finished, start=1):
        seconds += trial.seconds or 0.0
        first = summarize(outcome.search_id, finished[:n], objectives, outcome.constraints, outcome.selection)
        volume = full.geometry.volume(objective_values(first.pareto, objectives))  # the end's geometry: one scale
        crossed = passed is None and volume > full.sweep_volume
        if n in args.at or crossed or n == len(finished):
            mark = "  <- first above" if crossed else ""
            print(f"{n:5d}  {volume:.4f}  {ratio(volume)}  {seconds / 60:6.1f} min (trial {trial.number}){mark}")
        passed = n if crossed else passed
    print(f"\nabove the sweep's hypervolume from trial count {passed}" if passed else "\nnever above the sweep's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
