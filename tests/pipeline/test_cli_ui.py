"""`python -m pipeline ui` (`make ui`): says which page holds the latest sweep's answer, in the model-training view,
before it starts the UI; prints the page on the tracking server when the store is one."""

from __future__ import annotations

from pipeline import cli
from pipeline.tracking import Tracker
from tests.pipeline.reporting.test_report import write_toy_sweep


def test_ui_names_the_latest_sweeps_page(isolated, capsys):
    assert cli.main(["ui", "--print-only"]) == 0
    assert "no run in" in capsys.readouterr().out
    tracker = Tracker(isolated["MLFLOW_TRACKING_URI"])
    with tracker.run("tiny", {"run_type": "chain", "recipe": "tiny", "ordering": "prune"}) as run_id:
        pass  # a recipe's own run: the page `make ui` names while there is no sweep
    assert cli.main(["ui", "--print-only"]) == 0
    page = f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert capsys.readouterr().out.strip() == f"the latest run tiny, its stages on its page: {page}"
    sweep_run = write_toy_sweep(tracker)
    assert cli.main(["ui", "--print-only", "--port", "5123"]) == 0
    page = f"http://127.0.0.1:5123/#/experiments/{tracker.experiment_id}/runs/{sweep_run}?workflowType=machine_learning"
    assert capsys.readouterr().out.strip() == f"the latest sweep toy-sweep-0000, its verdict on the run's page: {page}"


def test_run_urls_point_at_the_tracking_server_when_there_is_one(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert tracker.ui_url("abc").startswith("http://127.0.0.1:5000/#/experiments/")
    tracker.uri = "https://mlflow.example.org/"  # a team's server (no request is made)
    url = tracker.ui_url("abc")
    assert (
        url
        == f"https://mlflow.example.org/#/experiments/{tracker.experiment_id}/runs/abc?workflowType=machine_learning"
    )
