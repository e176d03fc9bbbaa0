"""Optuna's storage through a database restart: calls retried on a lost connection (one line each) until it is
back, a clear StorageUnreachable when it stays away past PIPELINE_STORAGE_TIMEOUT_S, bad requests not retried."""

from __future__ import annotations

import threading
import time

import optuna
import pytest

from pipeline.search.storage import RetryingRDBStorage, StorageUnreachable, connection_lost


@pytest.fixture
def cluster(pg_cluster, monkeypatch):
    pg_cluster.start()
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password())
    return pg_cluster


def test_a_study_goes_on_through_a_database_restart(cluster, capsys):
    storage = RetryingRDBStorage(cluster.url("optuna"))
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    cluster.stop()
    restarted = threading.Thread(target=lambda: (time.sleep(3), cluster.start()))
    restarted.start()
    try:
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # waits for the database, then goes on
    finally:
        restarted.join()  # before the fixture stops the cluster: it must not start again after that
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert "study database unreachable" in capsys.readouterr().err


def test_a_database_that_stays_away_stops_with_a_message(cluster, monkeypatch):
    storage = RetryingRDBStorage(cluster.url("optuna"))
    optuna.create_study(study_name="s", storage=storage)
    cluster.stop()
    monkeypatch.setenv("PIPELINE_STORAGE_TIMEOUT_S", "2")
    with pytest.raises(StorageUnreachable, match="did not answer for 2 s.*rerun the same command to resume"):
        storage.get_all_studies()


def test_only_lost_connections_are_retried(tmp_path):
    storage = RetryingRDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    with pytest.raises(KeyError):  # a missing study is the caller's error: raised at once
        storage.get_study_id_from_name("nope")
    assert not connection_lost(KeyError("x")) and not connection_lost(StorageUnreachable("gave up"))


def test_a_storage_url_is_logged_without_its_password():
    from pipeline.search.study import safe_url

    masked = safe_url("postgresql+psycopg://pipeline:s3cret-pw@db.example:5432/optuna")
    assert "s3cret-pw" not in masked and masked.startswith("postgresql+psycopg://pipeline:***@db.example:5432")
