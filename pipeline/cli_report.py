"""`python -m pipeline report [SWEEP|SEARCH]`: a sweep's (or search's) report from MLflow into reports/<id>/, logged
to its run, whose page then holds the verdict; `sweep` and `search` write theirs through the same functions."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli_exits import EXIT_INVALID, EXIT_OK, guarded


def add_command(sub) -> None:
    from pipeline.reporting.columns import report_runtimes

    report = sub.add_parser("report", help="write a sweep's (or search's) report from MLflow into reports/<id>/")
    report.add_argument(
        "sweep", nargs="?", default=None, help="sweep or search id (tag `sweep` / `search`); default: the latest sweep"
    )
    report.add_argument("--search", action="store_true", help="report the latest search (when no id is given)")
    report.add_argument("--against", default=None, help="a search report: the sweep id to compare frontiers with")
    report.add_argument("--reports-dir", type=Path, default=None, help="where reports go (default reports/)")
    report.add_argument(
        "--remeasure-latency",
        action="store_true",
        help="time every distinct model again, side by side, instead of each stage's own figure",
    )
    report.add_argument(
        "--runtime",
        default=None,
        choices=report_runtimes(),
        help="whose latency and top-1 the frontiers use (default: the sweep's first deploy runtime, else torch)",
    )


def run(args) -> int:
    if args.search or args.against or is_search_id(args.sweep):
        return report_search(args.sweep, args.reports_dir, args.against)
    return report_sweep(args.sweep, args.reports_dir, remeasure=args.remeasure_latency, runtime=args.runtime)


def is_search_id(run_id: str | None) -> bool:
    if not run_id:
        return False
    from pipeline.tracking import Tracker

    return bool(Tracker().search_runs(run_id))


def report_search(search_id: str | None, reports_dir: Path | None, against: str | None) -> int:
    from pipeline.reporting.search import report_search as write_report
    from pipeline.reporting.sweep_report import REPORTS_DIR
    from pipeline.tracking import Tracker

    def report() -> int:
        try:
            tracker = Tracker()
            outcome, out_dir = write_report(tracker, search_id, reports_dir or REPORTS_DIR, against=against)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
        print(f"\nreport of search {outcome.search_id}: {out_dir}/report.md (also report.html, PNG plots, CSV)")
        runs = tracker.search_runs(outcome.search_id)
        if runs:
            print(in_mlflow(tracker, runs[0].run_id))
        return EXIT_OK

    return guarded(report)


def report_sweep(
    sweep_id: str | None, reports_dir: Path | None, remeasure: bool = False, runtime: str | None = None
) -> int:
    from pipeline.reporting.sweep_report import REPORTS_DIR
    from pipeline.reporting.sweep_report import report_sweep as write_report
    from pipeline.tracking import Tracker

    def report() -> int:
        try:
            tracker = Tracker()
            done, out_dir = write_report(
                tracker, sweep_id, reports_dir or REPORTS_DIR, remeasure=remeasure, runtime=runtime
            )
        except ValueError as err:  # no such sweep, nothing finished yet
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
        print(f"\nreport of sweep {done.sweep_id}: {out_dir}/report.md (also report.html, PNG plots, CSV tables)")
        if done.sweep.get("run_id"):
            print(in_mlflow(tracker, str(done.sweep["run_id"])))
        return EXIT_OK

    return guarded(report)


def in_mlflow(tracker, run_id: str) -> str:
    """Where the verdict is in the MLflow UI: the run's page (on the tracking server, else where `make ui` serves)."""
    local = "" if tracker.is_server else " (start the UI with `make ui`)"
    return f"the verdict in MLflow: {tracker.ui_url(run_id)}{local}"
