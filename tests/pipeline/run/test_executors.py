"""Executors: a sweep on a local Ray instance logging to the team server (`make server auth=true`: MLflow on
PostgreSQL, signed in as a writer) over HTTP on 127.0.0.1, with two orderings running at once (shared prefixes still
trained once, through the cache's per-key lock) and one ordering whose worker dies mid-stage (reported failed; the
others finish); a search's two Ray workers sharing one Optuna study in the server's PostgreSQL."""

from __future__ import annotations

import logging
import re
import threading
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline.run.cache import StageCache
from tests.conftest import PROJECT_ROOT, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(team_server, monkeypatch):
    """The team server's URL; this test process reads it back as the admin."""
    for key, value in team_server.admin_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PGPASSWORD", team_server.server.cluster.password())
    return team_server.url


def test_ray_sweep_into_a_tracking_server(tmp_path, isolated, team_server, mlflow_server, cifar_root):
    stages = [
        {"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}},
        {"distill": {"epochs": 1, "lr": 0.01}},
        {"crash": {}},
    ]
    orderings = [["prune", "distill"], ["distill", "prune"], ["prune"], ["prune", "crash"]]
    raw = tiny_recipe(name="tiny-ray", stages=stages, orderings=orderings, executor={"name": "ray", "cpus": 1})
    path = write_recipe(tmp_path / "ray.yaml", raw)
    env = dict(team_server.client_env(isolated), PIPELINE_PLUGINS="tests.stages.crashing_stage",
               PYTHONPATH=str(PROJECT_ROOT), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")  # fmt: skip
    result = run_cli(["sweep", str(path), "--quiet", "--no-report"], env)  # the recipe's `executor:` picks Ray
    # The crashing ordering fails the sweep (exit 1); the three others finish.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 ordering(s) failed: prune>crash" in result.stderr

    sweep_id = re.search(r"^sweep (\S+), MLflow run", result.stdout, re.M).group(1)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep_id}'", max_results=1000)
    chains = {r.data.tags["ordering"]: r for r in runs if r.data.tags["run_type"] == "chain"}
    assert {o: r.info.status for o, r in chains.items()} == {
        "prune>distill": "FINISHED", "distill>prune": "FINISHED", "prune": "FINISHED", "prune>crash": "FAILED",
    }  # fmt: skip
    assert chains["prune>crash"].data.tags["error"]
    for ordering in ("prune>distill", "distill>prune", "prune"):
        assert {"top1", "artifact_bytes", "latency_ms_p50"} <= set(chains[ordering].data.metrics)
    # Shared prefixes (the baseline, then prune) were trained once although orderings ran at the same time.
    trained = [r.data.tags["cache_key"] for r in runs if r.data.tags.get("trained") == "true"]
    assert len(trained) == len(set(trained)) == 5  # baseline, prune, prune>distill, distill, distill>prune
    (sweep,) = [r for r in runs if r.data.tags["run_type"] == "sweep"]
    assert sweep.data.params["executor"] == "ray" and sweep.info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the dead worker's runs were closed


def test_cache_lock_lets_one_of_two_workers_compute_a_stage(tmp_path):
    cache, order = StageCache(tmp_path), []

    def worker(name: str):
        with cache.lock("k" * 64):
            order.append(f"{name} in")
            time.sleep(0.3)
            order.append(f"{name} out")

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_a_ray_task_logs_the_pipeline_progress_to_its_stderr(monkeypatch, capsys):
    """A Ray worker configures no logging: the task wrapper sends `pipeline` INFO lines (per-epoch progress) to
    stderr, which Ray forwards to the driver."""
    from pipeline.run.executors import _logging_to_stderr

    logger = logging.getLogger("pipeline")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh worker process
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    # and the task's own logger as a fresh process has it (an earlier test in this worker may have configured it)
    child = logging.getLogger("pipeline.core.training")
    for attr, value in (("handlers", []), ("level", logging.NOTSET), ("propagate", True), ("disabled", False)):
        monkeypatch.setattr(child, attr, value)

    def job(n: int) -> int:
        logging.getLogger("pipeline.core.training").info("train: epoch %d/2", n)
        return n

    assert _logging_to_stderr(job)(1) == 1
    assert _logging_to_stderr(job)(2) == 2  # a reused worker does not add a second handler
    assert capsys.readouterr().err == "[pipeline] train: epoch 1/2\n[pipeline] train: epoch 2/2\n"


def test_ray_search_workers_share_one_study(tmp_path, isolated, team_server, mlflow_server, cifar_root):
    """Two search workers as Ray tasks, one Optuna study (in the server's PostgreSQL), trials logged to the server."""
    stages = [{"prune": {"pruning_ratio": 0.3, "epochs": 1, "lr": 0.01}}, {"distill": {"epochs": 1, "lr": 0.01}}]
    search = {"orderings": [["prune"], ["prune", "distill"]], "space": {"prune.pruning_ratio": {"choices": [0.3, 0.5]}},
              "objectives": {"val_top1": "max", "artifact_bytes": "min"}, "trials": 3, "workers": 2,
              "sampler": "random", "registry": False,
              # The pruner's machinery in Ray workers (never pruning: too few finished peers) without a pruned trial.
              "pruner": {"method": "median", "startup_trials": 100, "peers": "all"}}  # fmt: skip
    raw = tiny_recipe(name="tiny-ray-search", stages=stages, search=search, executor={"name": "ray", "cpus": 1})
    raw["data"]["train_subset"] = 160
    path = write_recipe(tmp_path / "search.yaml", raw)
    env = dict(team_server.client_env(isolated), PYTHONPATH=str(PROJECT_ROOT), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    result = run_cli(["search", str(path), "--quiet", "--no-report"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    search_id = re.search(r"^search (\S+): (\d+) trials finished", result.stdout, re.M)
    assert search_id and int(search_id.group(2)) >= 3, result.stdout  # a worker may start one more as the other ends
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id], f"tags.search = '{search_id.group(1)}'", max_results=1000)
    trials = [r for r in runs if r.data.tags["run_type"] == "chain"]
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.params["search_worker"] for r in trials} == {"0", "1"}  # both workers ran trials
    assert len({r.data.tags["trial"] for r in trials}) == len(trials)  # one study numbers them
    trained = [r.data.tags["cache_key"] for r in runs if r.data.tags.get("trained") == "true"]
    assert len(trained) == len(set(trained))  # a prefix two trials share was trained once
    # Both workers reported every trial's epochs to the one fidelity study in the shared storage.
    fidelity = optuna.load_study(study_name=f"{search_id.group(1)}:fidelity:all",
                                 storage=team_server.server.cluster.url("optuna"))  # fmt: skip
    reported = [t for t in fidelity.trials if t.intermediate_values]
    assert {t.user_attrs["search_trial"] for t in fidelity.trials} == {int(r.data.tags["trial"]) for r in trials}
    assert reported and all(t.state.name == "COMPLETE" for t in fidelity.trials)
