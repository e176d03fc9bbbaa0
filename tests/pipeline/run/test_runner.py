"""End to end through the CLI on real CIFAR-10 images: MLflow runs, cache reuse, resume, reproducibility."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import load_artifact
from pipeline.core.data import DataConfig, load_data
from pipeline.core.metrics import accuracy, load_predictions
from pipeline.core.models import ModelConfig
from pipeline.recipe import validate_recipe
from pipeline.run.keys import plan_chain
from pipeline.run.runner import ordering_detail
from tests.conftest import PROJECT_ROOT, TINY_MODEL, make_photos, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow
METRICS = {
    "val_top1",
    "val_top5",
    "top1",
    "top5",
    "param_count",
    "nonzero_params",
    "artifact_bytes",
    "latency_ms_p50",
    "latency_ms_p90",
    "throughput_ips",
    "macs",
    "stage_seconds",
}


def _runs(env) -> tuple[MlflowClient, list]:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _split(runs):
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.fixture
def recipe_path(tmp_path, cifar_root) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe())


def test_run_tracks_parent_and_nested_stage_runs(recipe_path, isolated, tmp_path):
    result = run_cli(["run", str(recipe_path)], isolated)
    assert result.returncode == 0, result.stderr
    assert "reused from cache: none" in result.stdout

    client, runs = _runs(isolated)
    (parent,), children = _split(runs)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["recipe"] == "tiny" and parent.data.tags["ordering"] == "prune"
    assert parent.data.tags["ordering_detail"] == "prune[structured]"
    children.sort(key=lambda r: int(r.data.tags["stage_index"]))
    assert [(c.data.tags["stage"], c.data.tags["stage_index"], c.data.tags["cached"]) for c in children] == [
        ("train", "0", "false"),
        ("prune", "1", "false"),
    ]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["chain_ordering"] == "prune" and "ordering" not in child.data.tags
        assert child.info.status == "FINISHED"
        assert set(child.data.metrics) >= METRICS
        assert 0 <= child.data.metrics["top1"] <= 100
        assert child.data.params["epochs"] in {"1", "2"}
    # The parent charts each metric along the chain (step = stage index).
    history = client.get_metric_history(parent.info.run_id, "top1")
    assert sorted(m.step for m in history) == [0, 1]
    # Its time is the chain's: the stages' training seconds summed along it, not the last stage's alone.
    seconds = [c.data.metrics["stage_seconds"] for c in children]
    assert parent.data.metrics["chain_seconds"] == pytest.approx(sum(seconds))
    assert "stage_seconds" not in parent.data.metrics
    # The run's description (its page in the UI) is the chain's stage table.
    note = parent.data.tags["mlflow.note.content"]
    assert "| # | stage | cached | val top-1 % | test top-1 % | artifact | p50 ms | train s |" in note
    pruned = children[1].data.metrics
    assert f"| 1 | prune | no | {pruned['val_top1']:.2f} | {pruned['top1']:.2f} |" in note
    # Per-epoch training curves live in the stage's run.
    assert len(client.get_metric_history(children[0].info.run_id, "train_loss")) == 2
    # No metric shares a name with MLflow's Parameters column or with a param of the run.
    assert len(client.get_metric_history(children[0].info.run_id, "lr_epoch")) == 2
    for run in runs:
        assert "params" not in run.data.metrics and not set(run.data.metrics) & set(run.data.params)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recipe.yaml", "metrics.json", "model"} <= artifacts
    local = Path(client.download_artifacts(parent.info.run_id, "model", str(tmp_path / "dl")))
    model = load_artifact(next(local.glob("*.pt")))
    data = load_data(DataConfig(train_subset=320, val_subset=100, test_subset=100), ModelConfig(name=TINY_MODEL))
    top1, _ = accuracy(model, data.test_loader(100))
    assert top1 == pytest.approx(children[-1].data.metrics["top1"])
    val_top1, _ = accuracy(model, data.val_loader(100))
    assert val_top1 == pytest.approx(children[-1].data.metrics["val_top1"])
    assert parent.data.params["data_loader"] == "memory" and parent.data.params["val_images"] == "100"
    assert parent.data.params["mean"] == "0.4914,0.4822,0.4465" and parent.data.params["input_size"] == "3x32x32"
    # Every stage run holds its per-image predictions, which give the logged top-1 without running the model.
    for child in children:
        folder = Path(client.download_artifacts(child.info.run_id, "predictions", str(tmp_path / child.info.run_id)))
        for split, metric in (("test", "top1"), ("val", "val_top1")):
            stored = load_predictions(next(folder.glob("*.npz")), split)
            assert stored["labels"].shape == stored["torch"].shape == (100,)
            assert 100.0 * (stored["torch"] == stored["labels"]).mean() == pytest.approx(child.data.metrics[metric])


def test_rerun_reuses_cache_and_new_eval_settings_remeasure(recipe_path, isolated):
    assert run_cli(["run", str(recipe_path)], isolated).returncode == 0
    again = run_cli(["run", str(recipe_path)], isolated)
    assert again.returncode == 0, again.stderr
    assert "reused from cache: train, prune" in again.stdout
    _, runs = _runs(isolated)
    parents, children = _split(runs)
    assert len(parents) == 2
    latest = [c for c in children if c.data.tags["mlflow.parentRunId"] == parents[1].info.run_id]
    assert {c.data.tags["cached"] for c in latest} == {"true"}
    first = {
        c.data.tags["stage_index"]: c.data.metrics
        for c in children
        if c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    }
    for c in latest:
        assert c.data.metrics["top1"] == first[c.data.tags["stage_index"]]["top1"]
    # A different evaluation setting re-measures the cached models instead of retraining them.
    third = run_cli(["run", str(recipe_path), "evaluation.latency_runs=7"], isolated)
    assert third.returncode == 0 and "reused from cache: train, prune" in third.stdout


def test_same_recipe_and_seed_give_the_same_metrics(recipe_path, isolated, tmp_path):
    first = run_cli(["run", str(recipe_path)], isolated)
    fresh = dict(isolated, PIPELINE_CACHE_DIR=str(tmp_path / "other-cache"))
    second = run_cli(["run", str(recipe_path)], fresh)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    _, runs = _runs(isolated)
    _, children = _split(runs)
    by_index: dict[str, list[dict]] = {}
    for c in children:
        by_index.setdefault(c.data.tags["stage_index"], []).append(c.data.metrics)
    for a, b in by_index.values():
        for key in ("top1", "top5", "param_count", "nonzero_params", "macs", "artifact_bytes"):
            assert a[key] == b[key], key


def test_interrupted_run_is_marked_killed_and_resumes(tmp_path, isolated, cifar_root):
    long_stage = {"train": {"epochs": 300, "lr": 0.01, "schedule": "constant"}}
    path = write_recipe(tmp_path / "long.yaml", tiny_recipe(stages=[long_stage]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(path)],
        env=isolated,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list((tmp_path / "cache" / "stages").glob("*/*/record.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "baseline never finished"
        time.sleep(0.2)
    time.sleep(3)  # well inside the 300-epoch stage
    proc.send_signal(signal.SIGTERM)  # `kill`: ends the run like Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    _, runs = _runs(isolated)
    statuses = {(r.data.tags.get("stage_index", "parent")): r.info.status for r in runs}
    assert statuses == {"parent": "KILLED", "0": "FINISHED", "1": "KILLED"}
    (parent,), _ = _split(runs)
    assert parent.data.metrics == {} and parent.data.tags["stopped_at_stage"] == "1 (train)"

    resumed = run_cli(["run", str(path), "stages[0].train.epochs=1"], isolated)
    assert resumed.returncode == 0, resumed.stderr
    assert "stage 0 (train): reused from cache" in resumed.stderr
    assert "stage 1 (train): running" in resumed.stderr


def _cache_outputs(cache: Path) -> tuple[dict, dict]:
    """The baseline's record and its metrics, from a run's cache folder."""
    import json

    (record,) = cache.glob("stages/*/*/record.json")
    (metrics,) = record.parent.glob("metrics/*.json")
    return json.loads(record.read_text()), json.loads(metrics.read_text())


def test_a_run_killed_inside_a_stage_resumes_it_at_its_last_checkpoint(tmp_path, isolated, cifar_root):
    """SIGTERM during the baseline's training; the same command again goes on from the last epoch checkpoint (the log
    says where), clears the checkpoints, and ends with the model and metrics of a run that was never stopped."""
    recipe = tiny_recipe(stages=[], baseline={"epochs": 8, "lr": 0.05, "precision": "fp32"})
    path = write_recipe(tmp_path / "long.yaml", recipe)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], env=isolated, cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((tmp_path / "cache" / "stages" / "work").glob("*/fit-0.progress.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and not list((tmp_path / "cache").glob("stages/*/*/record.json"))

    resumed = run_cli(["run", str(path)], isolated)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming train at epoch " in resumed.stderr
    assert not list((tmp_path / "cache" / "stages" / "work").iterdir())  # removed once the stage is cached
    record, metrics = _cache_outputs(tmp_path / "cache")
    assert record["resumed"] and record["resumed"][0].startswith("train at epoch ")

    uninterrupted = {**isolated, "PIPELINE_CACHE_DIR": str(tmp_path / "cache2"),
                     "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow2.db'}"}  # fmt: skip
    assert run_cli(["run", str(path)], uninterrupted).returncode == 0
    record2, metrics2 = _cache_outputs(tmp_path / "cache2")
    assert record2["resumed"] == [] and record2["key"] == record["key"]
    assert [e["train_loss"] for e in record["train_history"]] == [e["train_loss"] for e in record2["train_history"]]
    for key in ("val_top1", "top1", "top5"):
        assert metrics[key] == metrics2[key], key
    a, b = (load_artifact(next(c.glob("stages/*/*/artifact.pt"))) for c in (tmp_path / "cache", tmp_path / "cache2"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_ordering_detail_tells_variants_of_a_stage_apart(cifar_root):
    stages = [
        {"prune": {"method": "unstructured", "pruning_ratio": 0.5}},
        {"inq": {"bits": 2}},
        {"distill": {}},
    ]
    recipe = validate_recipe(tiny_recipe(stages=stages))
    assert recipe.ordering == "prune>inq>distill"
    assert ordering_detail(recipe) == "prune[unstructured]>inq[2-bit]>distill"
    assert ordering_detail(validate_recipe(tiny_recipe(stages=[]))) == "train"


def test_a_photo_folder_runs_a_chain_end_to_end_streamed(tmp_path, isolated):
    """A user's job in small: an ImageFolder with train/ and val/ (ImageNet's layout) of non-square JPEGs, a timm model
    from a local checkpoint, at the model's own input size: streamed, validated on a held-out share of train/ and
    tested on val/."""
    import timm
    import torch

    photos = make_photos(tmp_path / "photos", {"train": 12, "val": 4}, size=(56, 44))
    torch.save({"state_dict_ema": timm.create_model(TINY_MODEL, num_classes=1000).state_dict()}, tmp_path / "ft.pt")
    recipe = tiny_recipe(
        data={"dataset": "imagefolder", "root": str(photos), "batch_size": 8, "img_size": 72, "workers": 1},
        model={"name": TINY_MODEL, "checkpoint": str(tmp_path / "ft.pt")},
        baseline={"epochs": 1, "lr": 0.01},
        stages=[{"distill": {"epochs": 1}}],
    )
    result = run_cli(["run", str(write_recipe(tmp_path / "photos.yaml", recipe))], isolated)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "data: loader stream (random_resized_crop augments each image as it is read)" in err
    assert "33 train, 3 val (10% of train/, held out), 12 test (val/)" in err
    assert "its classifier has 1000 classes, the data 3" in err
    assert "3x72x72, bilinear, crop 0.95, mean (0.5, 0.5, 0.5)" in err  # test_resnet's own config; the recipe's side
    _, runs = _runs(isolated)
    (parent,), children = _split(runs)
    assert parent.data.params["data_loader"] == "stream" and parent.data.params["crop_pct"] == "0.95"
    assert all({"val_top1", "top1"} <= set(c.data.metrics) for c in children)


def test_a_changed_dataset_is_never_served_stale(tmp_path, monkeypatch):
    root = make_photos(tmp_path / "data", {"train": 3, "test": 2}, size=(32, 32))
    recipe = validate_recipe(tiny_recipe(data={"dataset": "imagefolder", "root": str(root)}))
    before = [s.key for s in plan_chain(recipe)]
    moved = tmp_path / "moved"
    root.rename(moved)  # the same files elsewhere: the same keys (keys hash contents, not paths)
    recipe = validate_recipe(tiny_recipe(data={"dataset": "imagefolder", "root": str(moved)}))
    assert [s.key for s in plan_chain(recipe)] == before
    (moved / "train" / "bee" / "001.jpg").write_bytes((moved / "train" / "ant" / "000.jpg").read_bytes())
    after = [s.key for s in plan_chain(recipe)]
    assert all(a != b for a, b in zip(after, before, strict=True))  # every stage retrains from the changed data
