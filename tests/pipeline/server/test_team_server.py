"""The team server as `make server auth=true` runs it: PostgreSQL behind MLflow, MLflow's basic-auth app, a writer
and a reader. Requests without or with wrong credentials are refused (401), a reader's writes too (403); a recipe run
by a writer through the server keeps every password out of its runs, tags, params, metrics, artifacts and logs;
a sweep comes through the server and its database restarting with the results of an undisturbed one; a client
that loses the server for longer than it waits stops with exit 1 and resumes from its cache."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _call(url: str, path: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def test_the_rest_api_refuses_strangers_wrong_passwords_and_a_readers_writes(team_server):
    url, users = team_server.url, team_server.users
    writer = (team_server.WRITER, users[team_server.WRITER])
    reader = (team_server.READER, users[team_server.READER])
    assert _call(url, "/api/2.0/mlflow/experiments/search?max_results=5")[0] == 401
    assert _call(url, "/api/2.0/mlflow/experiments/search?max_results=5", (writer[0], "not-the-password"))[0] == 401
    status, made = _call(url, "/api/2.0/mlflow/experiments/create", writer, {"name": "team-acl"})
    assert status == 200
    experiment = made["experiment_id"]
    status, run = _call(url, "/api/2.0/mlflow/runs/create", writer, {"experiment_id": experiment})
    assert status == 200
    run_id = run["run"]["info"]["run_id"]
    metric = {"run_id": run_id, "key": "top1", "value": 1.0, "timestamp": 0}
    assert _call(url, "/api/2.0/mlflow/runs/log-metric", writer, metric)[0] == 200
    # The reader browses the writer's experiment and run, and cannot write into either.
    assert _call(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}", reader)[0] == 200
    assert _call(url, "/api/2.0/mlflow/runs/log-metric", reader, metric)[0] == 403
    assert _call(url, "/api/2.0/mlflow/runs/create", reader, {"experiment_id": experiment})[0] == 403
    assert _call(url, "/api/2.0/mlflow/runs/delete", reader, {"run_id": run_id})[0] == 403


def _everything_logged(team_server, tmp_path) -> str:
    """Every run's name, params, tags, metric names and artifact bytes on the server, as one text (read as admin)."""
    from tests.conftest import _environ

    parts = []
    with _environ(team_server.admin_env()):
        client = MlflowClient(team_server.url)
        for experiment in client.search_experiments():
            parts.append(json.dumps(dict(experiment.tags)))
            for run in client.search_runs([experiment.experiment_id], max_results=1000):
                parts += [run.info.run_name or "", json.dumps(run.data.params), json.dumps(run.data.tags)]
                parts += list(run.data.metrics)
                local = tmp_path / "artifacts" / run.info.run_id
                local.mkdir(parents=True)
                client.download_artifacts(run.info.run_id, "", str(local))
                parts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    return "\n".join(parts)


def _admin_client(team_server):
    return MlflowClient(team_server.url)


def _runs(client, recipe: str) -> list:
    experiment = client.get_experiment_by_name("compression")
    if experiment is None:  # the client has not created it yet
        return []
    return client.search_runs([experiment.experiment_id], f"tags.recipe = '{recipe}'", max_results=1000)


def _start(args: list[str], env: dict[str, str], tmp_path) -> subprocess.Popen:
    """`python -m pipeline ARGS` in the background, its output in files (a pipe nobody reads could fill and block)."""
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        command = [sys.executable, "-m", "pipeline", *args]
        return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=out, stderr=err, text=True)


def _finish(proc: subprocess.Popen, tmp_path) -> tuple[str, str]:
    proc.wait(timeout=600)
    return (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()


def _wait_for(predicate, proc, timeout: float = 300) -> None:
    """Poll until `predicate()` holds; the command under test must still be running (else the fault came too late)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, (
            "the command ended before the fault could be injected: " + proc.stderr.read()[-2000:]
        )
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _chain_results(runs) -> dict[str, tuple]:
    return {
        r.data.tags["ordering"]: (r.data.metrics["val_top1"], r.data.metrics["top1"], r.data.metrics["artifact_bytes"])
        for r in runs
        if r.data.tags["run_type"] == "chain"
    }


def test_a_sweep_comes_through_two_server_restarts_and_a_database_restart(
    team_server, tmp_path, isolated, cifar_root, monkeypatch
):
    """The same tiny sweep undisturbed (local store) and through the server while MLflow's server restarts twice and
    PostgreSQL once: the same results, every run FINISHED, none twice, and no password anywhere it logged."""
    stages = [{"prune": {"pruning_ratio": 0.3, "epochs": 2, "lr": 0.01}}, {"distill": {"epochs": 2, "lr": 0.01}}]
    raw = tiny_recipe(name="tiny-faults", stages=stages, orderings=[["prune", "distill"], ["distill", "prune"]])
    path = write_recipe(tmp_path / "faults.yaml", raw)
    reference_env = dict(isolated, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'ref.db'}",
                         PIPELINE_CACHE_DIR=str(tmp_path / "ref-cache"))  # fmt: skip
    reference = run_cli(["sweep", str(path), "--quiet", "--no-report"], reference_env)
    assert reference.returncode == 0, reference.stderr[-3000:]

    for key, value in team_server.admin_env().items():
        monkeypatch.setenv(key, value)
    client = _admin_client(team_server)
    proc = _start(["sweep", str(path), "--quiet", "--no-report"], team_server.client_env(isolated), tmp_path)
    server, cluster = team_server.server, team_server.server.cluster
    _wait_for(lambda: any(r.data.tags.get("run_type") == "stage" for r in _runs(client, "tiny-faults")), proc)
    server.restart()  # MLflow's server away for its whole start-up
    _wait_for(lambda: len(_runs(client, "tiny-faults")) >= 4, proc, timeout=120)
    cluster.restart()  # the database under the server: its pooled connections die
    time.sleep(2)
    assert proc.poll() is None, "the sweep ended before the second server restart"
    server.restart()
    out, err = _finish(proc, tmp_path)
    assert proc.returncode == 0, err[-3000:]
    assert "unreachable" in err  # the client said it was retrying

    runs = _runs(client, "tiny-faults")
    reference_runs = _runs(MlflowClient(reference_env["MLFLOW_TRACKING_URI"]), "tiny-faults")
    assert _chain_results(runs) == _chain_results(reference_runs)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_name for r in runs) == sorted(r.info.run_name for r in reference_runs)  # none twice
    for run in (r for r in runs if r.data.tags["run_type"] == "stage"):
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert len(history) == len({(m.step, m.value) for m in history})  # no metric logged twice

    logged = _everything_logged(team_server, tmp_path)
    server_logs = "".join(p.read_text(errors="replace") for p in server.root.rglob("*.log"))
    for secret in team_server.secrets():
        for where, text in (("runs and artifacts", logged), ("the CLI's output", out + err),
                            ("the server's logs", server_logs)):  # fmt: skip
            assert secret not in text, f"a password appears in {where}"


def test_a_client_that_loses_the_server_stops_with_exit_1_and_resumes_from_its_cache(
    team_server, tmp_path, isolated, cifar_root, monkeypatch
):
    raw = tiny_recipe(name="tiny-away", stages=[{"prune": {"pruning_ratio": 0.3, "epochs": 8, "lr": 0.01}}])
    path = write_recipe(tmp_path / "away.yaml", raw)
    env = dict(team_server.client_env(isolated), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
               MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")  # fmt: skip
    for key, value in team_server.admin_env().items():
        monkeypatch.setenv(key, value)
    client = _admin_client(team_server)
    proc = _start(["run", str(path), "--quiet"], env, tmp_path)
    trained = lambda: any(r.data.tags.get("stage") == "train" and r.info.status == "FINISHED"  # noqa: E731
                          for r in _runs(client, "tiny-away"))  # fmt: skip
    _wait_for(trained, proc)
    team_server.server.stop()  # gone for longer than the client waits
    _, err = _finish(proc, tmp_path)
    team_server.server.start()
    assert proc.returncode == 1, err[-3000:]
    assert "did not answer through all of MLflow's retries" in err and "Traceback" not in err
    assert "unreachable" in err  # each retry said on one line

    again = run_cli(["run", str(path), "--quiet"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing cached stages: train" in again.stderr
    assert "left RUNNING when the tracking server was unreachable" in again.stderr
    runs = _runs(client, "tiny-away")
    assert "RUNNING" not in {r.info.status for r in runs}
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert failed and all("could not be reached" in r.data.tags["error"] for r in failed)
