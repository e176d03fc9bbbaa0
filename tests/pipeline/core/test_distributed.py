"""Multi-process stage training: `torchrun --nproc_per_node 2` with gloo on the CPU runs a tiny recipe, rank 0
alone logs to MLflow, and it records the same metrics as a single-process run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import NullTracker
from tests.conftest import PROJECT_ROOT, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow


def _stage_runs(env) -> dict[str, dict[str, float]]:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags["run_type"] == "chain"]) == 1  # one process logged
    return {r.data.tags["stage"]: r.data.metrics for r in runs if r.data.tags["run_type"] == "stage"}


def test_torchrun_two_ranks_gives_the_metrics_of_one_process(tmp_path, isolated, cifar_root):
    path = write_recipe(tmp_path / "tiny.yaml", tiny_recipe())
    env = dict(isolated, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            "run",
            str(path),
            "--quiet",
        ],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("recipe tiny (prune)") == 1  # rank 0 prints the summary
    distributed = _stage_runs(env)

    single_env = dict(
        isolated,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'single.db'}",
        PIPELINE_CACHE_DIR=str(tmp_path / "single-cache"),
    )
    single = run_cli(["run", str(path), "--quiet"], single_env)
    assert single.returncode == 0, single.stderr[-2000:]
    alone = _stage_runs(single_env)
    assert set(distributed) == set(alone) == {"train", "prune"}
    for stage in alone:
        assert set(distributed[stage]) == set(alone[stage]), stage
        assert distributed[stage]["param_count"] == alone[stage]["param_count"]  # the same architecture after pruning
        assert 0 < distributed[stage]["top1"] <= 100


def test_null_tracker_logs_nothing():
    tracker = NullTracker()
    with tracker.run("x", {}) as run_id:
        tracker.log_metrics(run_id, {"a": 1.0})
        tracker.set_tags(run_id, {"b": "c"})
    assert run_id == ""
    with pytest.raises(AttributeError):
        tracker.client  # noqa: B018


def test_sync_batchnorm_shares_the_tensors_and_goes_back_to_plain_norms(monkeypatch):
    """Under several ranks `sync_batchnorm: true` swaps timm's norms for synchronised ones sharing their parameters and
    statistics (so training updates the originals), then puts the originals back: the cached model never holds
    SyncBatchNorm, which cannot run in a single process."""
    import timm
    import torch

    from pipeline.core import distributed

    model = timm.create_model("resnet10t", num_classes=4)
    assert distributed.sync_batchnorm_(model) is None  # one process: nothing to synchronise
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    before = {n: type(m) for n, m in model.named_modules()}
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    restore = distributed.sync_batchnorm_(model)
    synced = [n for n, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert synced and len(synced) == sum(issubclass(t, torch.nn.BatchNorm2d) for t in before.values())
    assert all(t is tensors[n] for n, t in [*model.named_parameters(), *model.named_buffers()])
    restore()
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(t is tensors[n] for n, t in [*model.named_parameters(), *model.named_buffers()])
