"""Runtimes are plug-ins: one registered `Runtime` is all a new one takes, and every list of runtimes (recipe
validation, metric names, report columns, export, measurement) comes from the registry."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from pipeline.core.metrics import EvalConfig, metric_catalogue
from pipeline.deploy import Runtime, export_files, get_runtime, runtime_file_bytes, runtime_names
from pipeline.deploy import runtimes as registry
from pipeline.deploy.measure import runtime_metrics_with_predictions
from pipeline.recipe import RecipeError, validate_recipe
from pipeline.reporting.columns import metric_columns, report_runtimes
from tests.conftest import synthetic_bundle, tiny_recipe


def _open(file, threads, batch_size):
    """The fake runtime runs its copy of the ONNX file in ONNX Runtime: any runtime would do."""
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]


def _convert(onnx_file, folder):
    (folder / "fake").mkdir()
    shutil.copy(onnx_file, folder / "fake" / "model.fake")


FAKE = Runtime(name="fakert", short="fk", format="fake", packages=("numpy",), file="fake/model.fake", open=_open,
               convert=_convert)  # fmt: skip


@pytest.fixture
def fake_runtime(monkeypatch):
    monkeypatch.setitem(registry._RUNTIMES, FAKE.name, FAKE)
    return FAKE


def test_the_built_in_runtimes_are_registered_plug_ins():
    assert runtime_names()[:2] == ("onnxruntime", "openvino")
    assert get_runtime("openvino").file == "openvino/model.xml" and get_runtime("onnxruntime").short == "ort"
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; known: onnxruntime, openvino"):
        get_runtime("tensorrt")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_runtime(get_runtime("openvino"))


def test_a_registered_runtime_is_validated_named_exported_and_measured(fake_runtime, tmp_path):
    recipe = validate_recipe(tiny_recipe(deploy={"runtimes": ["onnxruntime", "fakert"]}))
    assert recipe.deploy.runtimes == ["onnxruntime", "fakert"]
    assert "fakert.val_top1" in metric_catalogue(recipe.deploy.runtimes)
    assert "fakert" in report_runtimes() and "fakert.latency_ms_p50" in metric_columns()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).eval()
    bundle = synthetic_bundle(size=16)
    files = export_files(model, bundle.input_size, tmp_path, ["onnxruntime", "fakert"], opset=18)
    assert files["fakert"] == tmp_path / "fake" / "model.fake" and files["fakert"].is_file()
    assert runtime_file_bytes(files["fakert"]) == files["onnxruntime"].stat().st_size
    cfg = EvalConfig(latency_runs=5, warmup_runs=1, throughput_runs=2, throughput_batch_size=4)
    loaders = {"val": bundle.val_loader(8), "test": bundle.test_loader(8)}
    metrics, scored = runtime_metrics_with_predictions("fakert", files["fakert"], loaders, bundle.input_size, cfg,
                                                       threads=1)  # fmt: skip
    with torch.inference_mode():
        expected = model(next(iter(bundle.test_loader(32)))[0]).argmax(1).numpy()
    assert np.array_equal(scored["test"].predicted, expected) and metrics["fakert.latency_ms_p50"] > 0


def test_an_unregistered_runtime_is_refused_with_the_registered_ones(fake_runtime):
    with pytest.raises(RecipeError, match=r"^deploy\.runtimes\[0\]: .*'onnxruntime', 'openvino' or 'fakert'"):
        validate_recipe(tiny_recipe(deploy={"runtimes": ["tensorrt"]}))
