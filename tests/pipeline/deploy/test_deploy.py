"""What ships: every artifact format exported to ONNX and OpenVINO IR, loaded in ONNX Runtime and OpenVINO,
and compared with the torch model it came from; the int8 graph is real QDQ (uint8 activations, int8
weights), INQ's powers of two survive exactly; bad or missing runtimes are refused before any compute."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.int8 import is_int8
from pipeline.core.models import ModelState
from pipeline.deploy import ExportError, export_files, open_runtime, runtime_file_bytes, zipped_bytes
from pipeline.recipe import RecipeError, validate_recipe
from stages.base import get_stage
from tests.conftest import run_cli, stage_context, synthetic_bundle, tiny_recipe, write_recipe

BUNDLE = synthetic_bundle(n_train=256, n_test=256, classes=4, size=32)
RUNTIMES = ["onnxruntime", "openvino"]


def _ctx():
    return stage_context(BUNDLE, batch_size=32, augment=False)


def _run(stage: str, state: ModelState | None, **config) -> ModelState:
    entry = get_stage(stage)
    torch.manual_seed(0)
    return entry.run(copy.deepcopy(state), entry.config(**config), _ctx()).state


BF16 = {"precision": "bf16", "channels_last": True}  # what `auto` trains in on CPUs with native bf16 and on GPUs


@pytest.fixture(scope="module")
def states() -> dict[str, ModelState]:
    """A briefly trained test ResNet (32x32, 4 classes) after each stage whose artifact format differs; trained in
    bf16 with channels_last (qat in fp32, as it always is), so every check below also holds after bf16 training:
    INQ's powers of two exact in the ONNX file, the int8 graph agreeing with torch's int8 model."""
    base = _run("train", None, epochs=2, lr=0.05, **BF16)
    inq = _run("inq", base, bits=4, epochs=1, **BF16)
    return {
        "dense": base,
        "structured": _run("prune", base, pruning_ratio=0.5, epochs=1, lr=0.01, **BF16),
        "sparse": _run("prune", base, method="unstructured", pruning_ratio=0.5, epochs=1, lr=0.01, **BF16),
        "inq": inq,
        "int8": _run("qat", base, epochs=1, lr=0.005, calibration_batches=4),
        "inq_int8": _run("qat", inq, epochs=0, calibration_batches=4),
    }


@pytest.fixture(scope="module")
def exported(states, tmp_path_factory) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Each state's artifact reloaded from disk (what ships) and its files for both runtimes."""
    root = tmp_path_factory.mktemp("deploy")
    out = {}
    for name, state in states.items():
        save_artifact(state, root / f"{name}.pt")
        model = load_artifact(root / f"{name}.pt")
        out[name] = (model, export_files(model, BUNDLE.input_size, root / name, RUNTIMES, opset=18))
    return out


def _images(n: int = 256) -> np.ndarray:
    images, _ = next(iter(BUNDLE.test_loader(n)))
    return images.numpy()


@pytest.mark.parametrize("name", ["dense", "structured", "sparse", "inq"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp32_artifacts_match_torch_in_both_runtimes(exported, name, runtime):
    model, files = exported[name]
    x = _images(64)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    got = open_runtime(runtime, files[runtime], threads=1)(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    batch1 = open_runtime(runtime, files[runtime], threads=1, batch_size=1)(x[:1])
    np.testing.assert_allclose(batch1, expected[:1], rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["int8", "inq_int8"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_artifacts_agree_with_torch_int8(exported, name, runtime):
    model, files = exported[name]
    assert is_int8(model)
    x = _images(256)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    got = open_runtime(runtime, files[runtime], threads=1)(x)
    agreement = (got.argmax(1) == expected.argmax(1)).mean()
    assert agreement >= 0.99, f"{runtime} int8 argmax agrees with torch int8 on {agreement:.1%} of 256 images"


def _initializers(path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def test_int8_onnx_is_qdq_with_uint8_activations_and_int8_per_channel_weights(exported):
    _, files = exported["int8"]
    graph = onnx.load(str(files["onnxruntime"])).graph
    inits = _initializers(files["onnxruntime"])
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    for node in graph.node:
        if node.op_type == "QuantizeLinear":  # activations: uint8 zero points
            assert inits[node.input[2]].dtype == np.uint8, node.name
    weight_dq = [d for d in graph.node if d.op_type == "DequantizeLinear" and d.input[0] in inits]
    int8 = [d for d in weight_dq if inits[d.input[0]].dtype == np.int8]
    assert len(int8) >= 5 and all(inits[d.input[0]].ndim in (2, 4) for d in int8)  # conv and linear weights
    assert all(inits[d.input[1]].ndim == 1 and inits[d.input[1]].size > 1 for d in int8)  # scales per channel
    fp32_bytes = runtime_file_bytes(exported["dense"][1]["onnxruntime"])
    assert runtime_file_bytes(files["onnxruntime"]) < 0.4 * fp32_bytes


def _is_pow2_or_zero(values: np.ndarray) -> bool:
    nonzero = np.abs(values[values != 0]).astype(np.float64)
    return bool(np.all(np.exp2(np.round(np.log2(nonzero))) == nonzero))


def test_inq_powers_of_two_survive_export_exactly(states, exported):
    _, files = exported["inq"]
    inq_layers = list(states["inq"].pow2_grids)  # parameter names of the INQ weights
    inits = _initializers(files["onnxruntime"])
    for name in inq_layers:
        assert name in inits, f"{name} is not an initializer of the ONNX file"
        assert _is_pow2_or_zero(inits[name]), name
        assert np.array_equal(inits[name], states["inq"].model.get_parameter(name).detach().numpy())
    # OpenVINO's conversion folds BatchNorm (and more) into the convolution weights, so its IR holds the products
    # the runtime computes with, not the powers of two; the ONNX file is where they are kept exactly.


def test_inq_then_qat_keeps_powers_of_two_in_the_int8_graph(exported):
    _, files = exported["inq_int8"]
    int8 = [w for w in _initializers(files["onnxruntime"]).values() if w.dtype == np.int8 and w.ndim == 4]
    assert int8 and all(_is_pow2_or_zero(w) for w in int8)


def test_sparse_file_compresses_and_structured_file_is_smaller(exported):
    dense, sparse, structured = (exported[n][1]["onnxruntime"] for n in ("dense", "sparse", "structured"))
    # Runtimes run unstructured sparsity dense: the file is as big, but its zeros compress.
    assert runtime_file_bytes(sparse) == pytest.approx(runtime_file_bytes(dense), rel=0.02)
    assert zipped_bytes(sparse) < 0.75 * zipped_bytes(dense)
    assert runtime_file_bytes(structured) < 0.6 * runtime_file_bytes(dense)


def test_export_failure_names_the_op(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[:, 0]).real

    with pytest.raises(ExportError, match=r"ONNX export of Unexportable failed: .*No ONNX function .*aten\.linalg_eig"):
        export_files(Unexportable(), (1, 4, 4), tmp_path, ["onnxruntime"], opset=18)
    assert not (tmp_path / "model.onnx").exists() and not list(tmp_path.glob(".export-*"))


def test_unknown_runtime_is_refused_with_its_field_path():
    with pytest.raises(RecipeError, match=r"^deploy\.runtimes\[0\]: .*'onnxruntime' or 'openvino'"):
        validate_recipe(tiny_recipe(deploy={"runtimes": ["tensorrt"]}))
    with pytest.raises(RecipeError, match=r"deploy\.runtimes: .*twice"):
        validate_recipe(tiny_recipe(deploy={"runtimes": ["openvino", "openvino"]}))
    assert validate_recipe(tiny_recipe(deploy={})).deploy.runtimes == RUNTIMES  # the default: both


def test_a_runtime_that_is_not_installed_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(RecipeError, match=r"^deploy\.runtimes: openvino needs the Python package\(s\) openvino"):
        validate_recipe(tiny_recipe(deploy={"runtimes": ["onnxruntime", "openvino"]}))
    assert validate_recipe(tiny_recipe(deploy={"runtimes": ["onnxruntime"]})).deploy.runtimes == ["onnxruntime"]


def test_cli_refuses_a_bad_runtime_before_any_run(tmp_path, isolated):
    path = write_recipe(tmp_path / "bad.yaml", tiny_recipe(deploy={"runtimes": ["tflite"]}))
    result = run_cli(["run", str(path)], isolated)
    assert result.returncode == 2, result.stderr
    assert "deploy.runtimes[0]" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


def test_cli_export_writes_both_formats_from_an_artifact(states, tmp_path, isolated):
    save_artifact(states["int8"], tmp_path / "artifact.pt")
    result = run_cli(["export", str(tmp_path), "--out", str(tmp_path / "out")], isolated)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "openvino" / "model.xml").is_file()
    assert "onnxruntime:" in result.stdout and "openvino:" in result.stdout
    # The numbers to feed the files with travel beside them: the artifact's preprocessing.
    shipped = json.loads((tmp_path / "out" / "preprocessing.json").read_text())
    assert shipped["input_size"] == list(states["int8"].preprocessing["input_size"])
    assert shipped["mean"] == list(states["int8"].preprocessing["mean"])
    missing = run_cli(["export", "no-such-recipe", "--out", str(tmp_path / "x")], isolated)
    assert missing.returncode == 2 and "no artifact file, MLflow run id or valid recipe" in missing.stderr


# --- through the runner: every stage measured in the runtimes, logged to MLflow --------------------------


@pytest.mark.slow
def test_run_measures_every_stage_in_both_runtimes(tmp_path, isolated, cifar_root):
    from mlflow.tracking import MlflowClient

    raw = tiny_recipe(deploy={"runtimes": RUNTIMES, "threads": 1})
    result = run_cli(["run", str(write_recipe(tmp_path / "tiny.yaml", raw))], isolated)
    assert result.returncode == 0, result.stderr
    assert "ort top1" in result.stdout and "ov p50" in result.stdout
    client = MlflowClient(isolated["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compression")
    stages = client.search_runs([exp.experiment_id], "tags.run_type = 'stage'")
    assert len(stages) == 2  # baseline and prune
    for run in stages:
        metrics, tags = run.data.metrics, run.data.tags
        for runtime in RUNTIMES:
            for name in (
                "val_top1",
                "top1",
                "top5",
                "latency_ms_p50",
                "latency_ms_p90",
                "throughput_ips",
                "file_bytes",
            ):
                assert metrics[f"{runtime}.{name}"] > 0, f"{runtime}.{name}"
            # fp32: the exported model predicts what torch predicts (100 test images: 1 image = 1 point)
            assert abs(metrics[f"{runtime}.top1_delta_vs_torch"]) <= 1.0
        assert metrics["deploy_export_seconds"] > 0 and metrics["deploy_eval_seconds"] > 0
        assert tags["cpu_capability"] and tags["onnxruntime_version"] and tags["openvino_version"]
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "deploy")}
        assert {"deploy/model.onnx", "deploy/openvino"} <= logged
    # The report's side-by-side re-measure fetches each stage's exported files from MLflow and times them.
    from pipeline.reporting.latency import remeasure_latency
    from pipeline.tracking import Tracker

    tracker = Tracker(isolated["MLFLOW_TRACKING_URI"])
    frame = tracker.runs_frame("tags.run_type = 'stage'")
    for runtime in ("torch", *RUNTIMES):
        ms = remeasure_latency(tracker, frame, runtime, rounds=1, calls=3)
        assert set(ms) == set(frame["tags.cache_key"]) and all(v > 0 for v in ms.values())


def _runner(tmp_path, deploy: dict):
    from pipeline.recipe import validate_recipe
    from pipeline.run.runner import Runner
    from pipeline.tracking import Tracker

    recipe = validate_recipe(tiny_recipe(stages=[], deploy=deploy))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Runner(recipe, cache_dir=tmp_path / "cache", tracker=tracker, progress=False), tracker


@pytest.mark.slow
def test_an_export_failure_fails_the_stage_unless_deploy_is_optional(tmp_path, monkeypatch, cifar_root):
    import pipeline.run.runner

    def fail(*args, **kwargs):
        raise ExportError("ONNX export of ResNet failed: No ONNX function found for aten.some_op")

    monkeypatch.setattr(pipeline.run.runner, "export_files", fail)
    runner, tracker = _runner(tmp_path, {"runtimes": ["onnxruntime"], "required": True})
    with pytest.raises(ExportError, match="aten.some_op"):
        runner.run()
    (failed,) = tracker.find_runs("tags.run_type = 'stage'")
    assert failed.info.status == "FAILED" and "aten.some_op" in failed.data.tags["error"]

    runner, tracker = _runner(tmp_path, {"runtimes": ["onnxruntime"], "required": False})
    summary = runner.run()  # the trained baseline is reused from the cache; the chain goes on
    assert summary.results[0].metrics["top1"] > 0 and "onnxruntime.top1" not in summary.results[0].metrics
    finished = tracker.find_runs("tags.run_type = 'stage' and attributes.status = 'FINISHED'")
    assert "aten.some_op" in finished[0].data.tags["deploy_error"]
