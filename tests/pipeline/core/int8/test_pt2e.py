"""The PT2E backend: its BatchNorm folding is torchao's quantization-aware-training graph, exactly, at a fraction of
the cost; the fake-quant model pickles (the stage cache) and trains; the converted model is what the fake-quant model
computes, survives its artifact, and runs in ONNX Runtime and OpenVINO on the architectures people deploy, FX's
failures included (a TF port with "same" padding, a ViT)."""

from __future__ import annotations

import copy
import io
import time

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import numpy_helper
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

from pipeline.core.int8 import Int8Plan, calibrate_, get_backend
from pipeline.core.int8.pt2e_graph import BATCH_NORM, CONVS, capture, set_bn_training_
from pipeline.core.int8.qdq_quantizer import UNIT_END, QDQQuantizer
from pipeline.deploy import export_files, open_runtime

PT2E = get_backend("pt2e")
INPUT = (3, 32, 32)


def _model(name: str = "resnet10t", **kwargs) -> torch.nn.Module:
    """A timm model whose BatchNorm statistics have seen data (zero-initialised γ of residual blocks kept)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *INPUT))
    return model


def _calibrated(model: torch.nn.Module, *, training: bool = True) -> torch.nn.Module:
    prepared = PT2E.prepare(model, Int8Plan(INPUT))
    calibrate_(prepared, [torch.randn(16, *INPUT) for _ in range(2)], "cpu", training=training)
    return prepared


def test_the_folded_batchnorm_graph_is_torchaos_and_builds_in_a_fraction_of_its_time():
    model = _model()
    with torch.no_grad():  # torchao's graph divides by γ/σ: keep every γ away from zero for this comparison
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.add_(0.1)
    start = time.perf_counter()
    ours = PT2E.prepare(copy.deepcopy(model), Int8Plan(INPUT))
    ours_seconds = time.perf_counter() - start
    graph = capture(copy.deepcopy(model), INPUT)
    for bn in graph.graph.nodes:  # the same annotation: the unit of a conv followed by BatchNorm ends at the BatchNorm
        if bn.target is BATCH_NORM and bn.args[0].target in CONVS:
            bn.args[0].meta[UNIT_END] = bn.name
    set_bn_training_(graph, True)
    theirs = prepare_qat_pt2e(graph, QDQQuantizer(Int8Plan(INPUT), PT2E.scheme))
    images = [torch.randn(16, *INPUT)]
    for prepared in (ours, theirs):
        prepared.__dict__.pop("train", None)  # torchao's refuses train(); calibrate_ calls it
        calibrate_(prepared, images, "cpu", training=True)
        for quantizer in PT2E.fake_quantizers(prepared):
            quantizer.disable_observer()
        set_bn_training_(prepared, False)
    x = torch.randn(8, *INPUT)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ours_seconds < 10


def test_conversion_computes_what_the_fake_quant_model_computes():
    prepared = _calibrated(_model())
    PT2E.freeze_(prepared, observers=True, bn_stats=True)
    prepared.eval()
    converted = PT2E.convert(prepared)
    x = torch.randn(32, *INPUT)
    with torch.no_grad():
        fake, real = prepared(x), converted(x)
    output = next(n for n in prepared.graph.nodes if n.op == "output").args[0][0]  # the logits' fake quantizer
    steps = (real - fake).abs().max() / prepared.get_submodule(output.target).scale  # output quantization steps
    assert torch.isfinite(real).all() and float(steps) <= 2  # rounding order (folded vs divided BatchNorm) only
    assert (real.argmax(1) == fake.argmax(1)).float().mean() >= 0.95
    assert len(PT2E.int8_weights(converted)) == 15 and PT2E.float_ops(converted) == []


def test_the_fake_quant_model_pickles_as_its_float_model_and_state():
    model = _model()
    prepared = _calibrated(model)
    PT2E.freeze_(prepared, observers=False, bn_stats=True)
    buffer = io.BytesIO()
    torch.save({"model": prepared, "float": model}, buffer)  # as the stage cache holds a state and its wrapper
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    shared = {id(p) for p in loaded["float"].parameters()}
    assert all(id(p) in shared for p in loaded["model"].parameters())  # still one set of weights
    x = torch.randn(4, *INPUT)
    prepared.eval()
    loaded["model"].eval()
    with torch.no_grad():
        assert torch.equal(loaded["model"](x), prepared(x))
    assert loaded["model"].__dict__["_bn_frozen"]


def test_the_artifact_payload_is_the_converted_program_and_reads_back_exactly():
    converted = PT2E.convert(_calibrated(_model(), training=False))
    payload = PT2E.encode(converted, Int8Plan(INPUT))
    assert payload["program"].dtype == torch.uint8
    weights = sum(w.numel() for w in PT2E.int8_weights(converted).values())
    assert weights < payload["program"].numel() < 1.1 * weights  # int8 weights plus a deflated graph
    decoded = PT2E.decode(payload, None)
    x = torch.randn(3, *INPUT)  # another batch size than captured with: the batch stays dynamic
    with torch.no_grad():
        assert torch.equal(decoded(x), converted(x))
    assert PT2E.owns(decoded) and PT2E.int8_weights(decoded).keys() == PT2E.int8_weights(converted).keys()


ARCHITECTURES = {
    "resnet10t": {},
    "efficientnet_b0": {},
    "tf_efficientnet_lite0": {},  # TF "same" padding: pads computed from the input size (FX could not trace it)
    "mobilenetv3_large_100": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "ghostnet_100": {},
}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_int8_round_trip_through_both_runtimes(name, tmp_path):
    """Random weights make logits nearly tied, and one-step rounding differences between the reference ops and a
    runtime's int8 kernels compound through the layers (the random ViT's int8 logits correlate only 0.5 with its
    float ones), so logits are compared by correlation here, 0.85 (a wrong scale or layout gives about 0); a trained
    model's predictions are compared image by image in tests/pipeline/deploy/test_deploy.py."""
    converted = PT2E.convert(_calibrated(_model(name, **ARCHITECTURES[name]), training=False))
    files = export_files(converted, INPUT, tmp_path, ["onnxruntime", "openvino"], opset=18)
    graph = onnx.load(str(files["onnxruntime"])).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(inits[n.input[2]].dtype == np.uint8 for n in quantize)  # uint8 activations
    int8 = [v for v in inits.values() if v.dtype == np.int8 and v.ndim in (2, 4)]
    assert len(int8) == len(PT2E.int8_weights(converted))  # every int8 layer's weight, as int8
    x = torch.randn(16, *INPUT)
    with torch.inference_mode():
        expected = converted(x).numpy()
    for runtime, file in files.items():
        got = open_runtime(runtime, file, threads=1)(x.numpy())
        assert np.isfinite(got).all() and _corr(got, expected) > 0.85, f"{runtime} vs torch int8"
