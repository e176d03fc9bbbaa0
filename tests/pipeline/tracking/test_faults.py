"""A tracking server that goes away: MLflow's retries said on one line each, the give-up recognised, the runs it
could not close remembered and closed as FAILED by the next command that reaches the store."""

from __future__ import annotations

import logging

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import TAGS, Tracker, faults
from tests.conftest import free_port


def test_a_server_that_does_not_answer_is_retried_on_one_line_each_then_recognised(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    faults.install_retry_line()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(MlflowException) as caught:
        MlflowClient(url).search_experiments()
    assert faults.unreachable(caught.value)
    lines = [line for line in capsys.readouterr().err.splitlines() if "unreachable" in line]
    assert len(lines) == 2 and "127.0.0.1 unreachable (NewConnectionError): retrying with backoff" in lines[0]
    assert "Retrying (Retry(" not in capsys.readouterr().err  # urllib3's own warning is replaced, not repeated
    assert not faults.unreachable(ValueError("bad value"))
    assert not faults.unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'x' not found"))


def test_the_retry_filter_passes_urllib3s_other_messages(caplog):
    faults.install_retry_line()
    faults.install_retry_line()  # idempotent
    logger = logging.getLogger(faults.URLLIB3_LOGGER)
    assert logger.filters.count(faults._FILTER) == 1
    with caplog.at_level(logging.WARNING, logger=faults.URLLIB3_LOGGER):
        logger.warning("Connection pool is full, discarding connection: %s", "host")
    assert "Connection pool is full" in caplog.text


def test_a_run_the_server_was_not_there_to_close_is_closed_as_failed_next_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    away = MlflowException("API request to http://x/api failed with exception Max retries exceeded with url")
    with pytest.raises(MlflowException), tracker.run("download", {TAGS.recipe: "r"}) as answered_id:
        raise away  # a connection error, but the store answers: the run is closed at once, as any failure
    assert tracker.client.get_run(answered_id).info.status == "FAILED"

    monkeypatch.setattr(faults, "server_answers", lambda uri, timeout=5: False)  # now the server is away
    with pytest.raises(MlflowException), tracker.run("chain", {TAGS.recipe: "r"}) as run_id:
        raise away
    assert tracker.client.get_run(run_id).info.status == "RUNNING"  # nothing was sent: the server was away
    assert run_id in (tmp_path / "cache" / "unclosed-runs.json").read_text()
    monkeypatch.undo()
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))

    Tracker(uri)  # the next command that reaches the store closes it
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[TAGS.error] == faults.UNCLOSED_ERROR
    assert "closed 1 run(s) left RUNNING" in capsys.readouterr().err
    assert run_id not in (tmp_path / "cache" / "unclosed-runs.json").read_text()
    assert faults.close_remembered(tracker.client, uri, TAGS.error, tmp_path / "cache") == []  # only once


def test_a_server_answering_503_is_retried_on_one_line_each(monkeypatch, capsys):
    """A server restarting behind a proxy answers 503: MLflow's client retries (urllib3 logs that at debug level)."""
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    faults.install_retry_line()
    try:
        with pytest.raises(MlflowException):
            MlflowClient(f"http://127.0.0.1:{server.server_port}").search_experiments()
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tracking server answered 503")]
    assert len(lines) == 2 and "/api/2.0/mlflow/experiments/search: retrying with backoff" in lines[0]
    assert "Incremented Retry" not in err
