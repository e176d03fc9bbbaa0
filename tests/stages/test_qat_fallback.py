"""`qat: {fp32_layers: [...] | auto, max_drop}`: the int8 model keeps the named (or the most sensitive per MAC) layers
in floating point, and only those; it ships, reloads and exports with float weights exactly there (QDQ counted per
layer in the ONNX graph) and agrees with torch in both runtimes; the automatic choice fits its drop budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError
from torch import nn

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.int8 import get_backend
from pipeline.deploy.export import export_files
from pipeline.deploy.runtimes import open_runtime
from pipeline.recipe import RecipeError, validate_recipe
from stages.qat import QATConfig, run_qat
from stages.qat_fallback import choose_fp32_layers, layer_macs, weighted_layers
from tests.conftest import stage_context, synthetic_bundle, tiny_recipe, trained_state

BUNDLE = synthetic_bundle(n_train=128, n_val=64, n_test=64, size=32)
FALLBACK = ("conv1.0", "layer3.*", "fc")  # the stem, a whole stage by glob, the classifier
RUNTIMES = ["onnxruntime", "openvino"]
PT2E = get_backend("pt2e")


def _ctx():
    return stage_context(BUNDLE, batch_size=32, augment=False)


@pytest.fixture(scope="module")
def trained():
    return trained_state(BUNDLE, epochs=2, lr=0.05)


@pytest.fixture(scope="module")
def fallback(trained, tmp_path_factory):
    """The explicit fallback after one QAT epoch, its artifact reloaded, and its exported files."""
    import copy

    out = run_qat(copy.deepcopy(trained), QATConfig(epochs=1, lr=0.01, calibration_batches=2, fp32_layers=FALLBACK),
                  _ctx())  # fmt: skip
    root = tmp_path_factory.mktemp("fallback")
    save_artifact(out.state, root / "int8.pt")
    loaded = load_artifact(root / "int8.pt")
    return out, loaded, export_files(loaded, BUNDLE.input_size, root / "export", RUNTIMES, opset=18)


def _float_layers(model: nn.Module) -> int:
    """Conv / linear ops of a converted graph whose weight is not dequantized int8."""
    weighted = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    nodes = [n for n in model.graph.nodes if n.op == "call_function" and n.target in weighted]
    return sum(not (n.args[1].op == "call_function" and "dequantize" in str(n.args[1].target)) for n in nodes)


def test_named_layers_stay_float_and_every_other_layer_is_int8(fallback):
    out, loaded, _ = fallback
    expected = ["conv1.0", "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3", "layer3.0.downsample.1", "fc"]
    int8 = PT2E.int8_weights(loaded)
    assert _float_layers(loaded) == len(expected)
    assert len(int8) == 16 - len(expected) and not set(int8) & set(expected)
    assert out.metrics["int8_fp32_layers"] == len(expected) and out.metrics["int8_layers"] == len(int8)
    x = torch.randn(4, *BUNDLE.input_size)
    with torch.inference_mode():  # the artifact reloads into the same model (float weights where they were)
        assert torch.equal(loaded(x), PT2E.convert(out.state.model)(x))


def test_onnx_carries_qdq_weights_only_where_the_layer_is_int8(fallback, trained):
    _, loaded, files = fallback
    graph = onnx.load(str(files["onnxruntime"])).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    int8_shapes, float_shapes = [], []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        weight = producers.get(node.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear" and inits[weight.input[0]].dtype == np.int8:
            int8_shapes.append(inits[weight.input[0]].shape)
        else:
            value = inits.get(node.input[1])
            assert value is not None and value.dtype == np.float32, node.name
            float_shapes.append(value.shape if node.op_type != "MatMul" else value.T.shape)
    shapes = {n: tuple(m.weight.shape) for n, m in trained.model.named_modules() if n in weighted_layers(trained.model)}
    fp32 = ["conv1.0", "layer3.0.conv1", "layer3.0.conv2", "layer3.0.conv3", "layer3.0.downsample.1", "fc"]
    assert sorted(float_shapes) == sorted(shapes[n] for n in fp32)
    assert sorted(int8_shapes) == sorted(s for n, s in shapes.items() if n not in fp32)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fallback_model_agrees_with_torch_in_both_runtimes(fallback, runtime):
    _, loaded, files = fallback
    images, _ = next(iter(BUNDLE.test_loader(64)))
    with torch.inference_mode():
        expected = loaded(images).numpy()
    got = open_runtime(runtime, files[runtime], threads=1)(images.numpy())
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98


def test_auto_keeps_the_layers_that_buy_back_the_most_drop_per_mac_within_the_budget(trained):
    model = trained.model.eval()
    loader = BUNDLE.with_val_subset(64).eval_loader("val")
    calibration = [images for images, _ in BUNDLE.train_loader(32, seed=0, augment=False)][:2]
    with torch.no_grad():  # a classifier hopeless in int8: a huge weight per class on a feature that is always 0 (its
        model.layer4[0].bn2.bias[0] = -1e4  # ReLU input is very negative) ruins each class's int8 scale, not its float
        model.fc.weight[:, 0] = 1e3  # output
    everywhere = choose_fp32_layers(model, 100.0, loader, calibration, BUNDLE.input_size, PT2E.scheme)
    assert everywhere.layers == [] and everywhere.predicted_drop == everywhere.int8_predicted_drop
    tight = choose_fp32_layers(model, 0.0, loader, calibration, BUNDLE.input_size, PT2E.scheme)
    assert "fc" in tight.layers and tight.predicted_drop <= 0.0 < tight.int8_predicted_drop
    macs = layer_macs(model, BUNDLE.input_size)
    assert tight.fp32_macs_share == pytest.approx(sum(macs[n] for n in tight.layers) / sum(macs.values()))
    assert macs["conv1.0"] == 16 * 16 * 16 * 27  # per image: outputs x (in channels x kernel)


def test_auto_runs_as_a_stage_and_records_its_prediction(trained):
    import copy

    config = QATConfig(epochs=0, calibration_batches=2, fp32_layers="auto", max_drop=0.0, allocation_images=100)
    out = run_qat(copy.deepcopy(trained), config, _ctx())
    kept = int(out.metrics["int8_fp32_layers"])
    assert out.metrics["allocation_predicted_drop"] <= 0.0 and "allocation_measured_drop" in out.metrics
    assert _float_layers(PT2E.convert(out.state.model)) == kept  # exactly the kept layers run in fp32


def test_bad_fallback_options_are_refused_at_load_with_their_path():
    with pytest.raises(ValidationError, match="needs max_drop"):
        QATConfig(fp32_layers="auto")
    with pytest.raises(ValidationError, match="only used with fp32_layers: auto"):
        QATConfig(max_drop=0.5)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.qat\.max_drop") as err:
        validate_recipe(tiny_recipe(stages=[{"train": {"epochs": 1}},
                                            {"qat": {"fp32_layers": "auto", "max_drop": -1}}]))  # fmt: skip
    assert "greater than or equal to 0" in str(err.value)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.qat\.fp32_layers.*'layer9\.\*' matches no conv or linear"):
        validate_recipe(tiny_recipe(stages=[{"train": {"epochs": 1}}, {"qat": {"fp32_layers": ["layer9.*"]}}]))


def test_recipes_without_fallback_keep_their_cache_keys():
    assert "fp32_layers" not in QATConfig().model_dump() and "max_drop" not in QATConfig().model_dump()
    assert QATConfig(fp32_layers="auto", max_drop=1).model_dump()["max_drop"] == 1
