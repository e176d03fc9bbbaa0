"""`python -m pipeline ui`: the MLflow UI over the project's store (`make ui`), saying first which page holds the
answer: the latest sweep's or search's run, in the model-training view. Against a tracking server
(`MLFLOW_TRACKING_URI=http…`) nothing is started: the page is on that server."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def add_command(sub) -> None:
    cmd = sub.add_parser("ui", help="start the MLflow UI on the project's store; print the latest sweep's page")
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=5000)
    cmd.add_argument("--print-only", action="store_true", help="print the page's address, start nothing")


def latest_answer(tracker) -> tuple[str, str] | None:
    """(what, run id) of the newest sweep or search run in the experiment, e.g. ('sweep ui-sweep-1a2b', id); with
    neither, of the newest recipe run ('run transfer-ptq')."""
    from pipeline.tracking import TAGS

    runs = [*tracker.sweep_runs(), *tracker.search_runs()] or tracker.plain_runs()
    if not runs:
        return None
    run = max(runs, key=lambda r: r.start_time)
    kind = "sweep" if TAGS.sweep in run.tags else "search" if TAGS.search in run.tags else "run"
    return f"{kind} {run.tags.get(TAGS.sweep) or run.tags.get(TAGS.search) or run.tags.get(TAGS.recipe)}", run.run_id


def run(args) -> int:
    from pipeline.tracking import Tracker

    tracker = Tracker()
    base = f"http://{args.host}:{args.port}"
    found = latest_answer(tracker)
    if found is None:
        print(f"MLflow UI: {base} (no run in {tracker.uri} yet: `make recipe=NAME` or `make sweep recipe=NAME`)")
    else:
        what, run_id = found
        where = "its verdict on the run's page" if what.startswith(("sweep", "search")) else "its stages on its page"
        print(f"the latest {what}, {where}: {tracker.ui_url(run_id, base)}")
    if args.print_only or tracker.is_server:
        return 0
    sys.stdout.flush()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    command = [mlflow, "ui", "--backend-store-uri", tracker.uri, "--host", args.host, "--port", str(args.port)]
    os.execv(mlflow, command)  # the UI in this process's place: Ctrl-C stops it as before
