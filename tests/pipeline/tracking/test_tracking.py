"""The Tracker's queries by meaning: sweep, chain and stage runs come back as plain RunRecords."""

from __future__ import annotations

import pytest

from pipeline.tracking import EXPERIMENT_KIND_TAG, TAGS, RunRecord, RunType, Tracker, records_from_frame


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _sweep(tracker: Tracker, sweep_id: str, orderings: dict[str, str]) -> dict[str, str]:
    """A sweep run with one chain per ordering (ending with the given status) and one stage run below each;
    returns ordering -> chain run id. Runs meant to stay RUNNING are left open."""
    chain_ids = {}
    sweep_run = tracker.client.create_run(
        tracker.experiment_id, tags={TAGS.sweep: sweep_id, TAGS.run_type: RunType.SWEEP}
    ).info.run_id
    for ordering, status in orderings.items():
        tags = {TAGS.sweep: sweep_id, TAGS.parent_run_id: sweep_run}
        chain = tracker.client.create_run(
            tracker.experiment_id, tags={**tags, TAGS.run_type: RunType.CHAIN, TAGS.ordering: ordering}
        ).info.run_id
        stage_tags = {TAGS.sweep: sweep_id, TAGS.parent_run_id: chain, TAGS.run_type: RunType.STAGE,
                      TAGS.cache_key: f"key-{ordering}", TAGS.cached: "false"}  # fmt: skip
        stage = tracker.client.create_run(tracker.experiment_id, tags=stage_tags).info.run_id
        tracker.log_metrics(stage, {"top1": 50.0})
        if status != "RUNNING":
            tracker.client.set_terminated(stage, status)
            tracker.client.set_terminated(chain, status)
        chain_ids[ordering] = chain
    tracker.client.set_terminated(sweep_run, "FINISHED")
    return chain_ids


def test_queries_return_plain_records_of_one_sweep(tracker):
    chains = _sweep(tracker, "s-1", {"a>b": "FINISHED", "b>a": "FAILED"})
    _sweep(tracker, "s-2", {"a": "FINISHED"})
    (sweep,) = tracker.sweep_runs("s-1")
    assert isinstance(sweep, RunRecord) and sweep.tags[TAGS.sweep] == "s-1"
    assert [r.tags[TAGS.sweep] for r in tracker.sweep_runs()] == ["s-2", "s-1"]  # newest first
    (finished,) = tracker.chain_runs("s-1", status="FINISHED")
    assert finished.run_id == chains["a>b"] and finished.parent_id == sweep.run_id
    assert {r.run_id for r in tracker.chain_runs("s-1")} == set(chains.values())
    stages = tracker.stage_runs("s-1")
    assert {r.parent_id for r in stages} == set(chains.values()) and stages[0].metrics == {"top1": 50.0}
    assert not stages[0].flag(TAGS.cached)
    runs = tracker.read_sweep("s-1")
    assert (len(runs.sweeps), len(runs.chains), len(runs.stages)) == (1, 2, 2) and not runs.empty
    assert tracker.read_sweep("nope").empty


def test_fail_open_ordering_runs_closes_only_that_orderings_open_runs(tracker):
    chains = _sweep(tracker, "s-1", {"a>b": "RUNNING", "b>a": "RUNNING", "a": "FINISHED"})
    assert tracker.fail_open_ordering_runs("s-1", "a>b", "worker died") == 2  # its chain and its stage
    status = {r.run_id: r.status for r in tracker.chain_runs("s-1")}
    assert status == {chains["a>b"]: "FAILED", chains["b>a"]: "RUNNING", chains["a"]: "FINISHED"}
    (failed,) = [r for r in tracker.stage_runs("s-1") if r.parent_id == chains["a>b"]]
    assert failed.status == "FAILED" and failed.tags[TAGS.error] == "worker died"


def test_records_from_a_runs_frame(tracker):
    _sweep(tracker, "s-1", {"a": "FINISHED"})
    frame = tracker.runs_frame(f"tags.{TAGS.run_type} = '{RunType.STAGE}'")
    (record,) = records_from_frame(frame)
    (direct,) = tracker.stage_runs("s-1")
    assert (record.run_id, record.status, record.metrics, record.tags[TAGS.cache_key]) == (
        direct.run_id, "FINISHED", {"top1": 50.0}, "key-a",
    )  # fmt: skip
    assert record.start_time == direct.start_time


def test_experiment_is_marked_as_model_training_not_genai(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment created before (untagged) is marked when opened; a kind someone chose in the UI is kept.
    older = tracker.client.create_experiment("older")
    chosen = tracker.client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(uri, experiment="older"), Tracker(uri, experiment="chosen")
    assert tracker.client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracker.client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_metrics_are_logged_under_names_apart_from_mlflows_params_and_read_back_from_older_runs(tracker):
    new = tracker.client.create_run(tracker.experiment_id, tags={TAGS.run_type: RunType.STAGE}).info.run_id
    tracker.log_params(new, {"lr": 0.1})
    tracker.log_metrics(new, {"params": 1000.0, "lr": 0.05, "top1": 50.0})
    assert set(tracker.client.get_run(new).data.metrics) == {"param_count", "lr_epoch", "top1"}
    old = tracker.client.create_run(tracker.experiment_id, tags={TAGS.run_type: RunType.STAGE}).info.run_id
    tracker.client.log_metric(old, "params", 2000.0)  # as an older version logged it
    records = {r.run_id: r for r in tracker.stage_runs()}
    assert records[new].metrics == {"param_count": 1000.0, "lr_epoch": 0.05, "top1": 50.0}
    assert records[old].metrics == {"param_count": 2000.0}


def test_downloads_draw_no_progress_bar_into_a_redirected_log(tracker, tmp_path, capfd):
    """Redirected (not a terminal), MLflow's 'Downloading artifacts' bar printed a line per download into run logs."""
    import os

    source = tmp_path / "model.txt"
    source.write_text("weights")
    with tracker.run("r", {}) as run_id:
        tracker.log_artifact(run_id, source, "model")
    got = tracker.download_artifact(run_id, "model/model.txt", tmp_path / "down")
    assert got.read_text() == "weights"
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # set only around the download
