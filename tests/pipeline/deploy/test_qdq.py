"""The int8 model as QDQ on the architectures people deploy: the torch int8 model (the `qat` stage's FX graph,
calibrated, randomly initialised) lowered to QDQ, exported, and run in ONNX Runtime and OpenVINO.

Random weights make logits nearly tied and let the one-step rounding differences between fbgemm's int8 kernels
and a runtime's compound through the layers, so these compare logits by correlation; a trained model's
predictions are compared image by image in test_deploy.py (>= 99 % argmax agreement)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import numpy_helper

from pipeline.deploy import ExportError, export_files, open_runtime
from pipeline.deploy.qdq import QDQExportError, to_qdq
from stages.qat import calibrate_, convert_int8, prepare_qat

pytestmark = pytest.mark.slow
INPUT = (3, 32, 32)
ARCHITECTURES = {
    "resnet10t": {},
    "resnet18": {},
    "efficientnet_b0": {},
    "mobilenetv3_large_100": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "ghostnet_100": {},
}


def _int8(name: str, kwargs: dict) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    prepared = prepare_qat(timm.create_model(name, num_classes=10, **kwargs), INPUT, [])
    batches = [(torch.randn(8, *INPUT), torch.zeros(8)) for _ in range(2)]
    calibrate_(prepared, batches, 2, torch.device("cpu"), training=False)
    return convert_int8(prepared)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_int8_round_trip(name, tmp_path):
    converted = _int8(name, ARCHITECTURES[name])
    x = torch.randn(16, *INPUT)
    qdq = to_qdq(converted, x[:2])
    with torch.inference_mode():
        expected, simulated = converted(x).numpy(), qdq(x).numpy()
    assert _corr(simulated, expected) > 0.9

    files = export_files(converted, INPUT, tmp_path, ["onnxruntime", "openvino"], opset=18)
    graph = onnx.load(str(files["onnxruntime"])).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(inits[n.input[2]].dtype == np.uint8 for n in quantize)  # uint8 activations
    assert any(v.dtype == np.int8 and v.ndim == 4 for v in inits.values())  # int8 conv weights
    for runtime, file in files.items():
        got = open_runtime(runtime, file, threads=1)(x.numpy())
        assert np.isfinite(got).all()
        assert _corr(got, simulated) > 0.9, f"{runtime} vs the QDQ graph it runs"
        assert _corr(got, expected) > 0.9, f"{runtime} vs torch int8"


def test_an_op_without_a_qdq_form_is_named(tmp_path):
    converted = _int8("resnet10t", {})
    node = next(n for n in converted.graph.nodes if str(getattr(n.target, "__name__", "")).startswith("add_relu"))
    node.target = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
    converted.recompile()
    expected = rf"no QDQ form for 1 op\(s\): {node.name} \(torch.ops.quantized.embedding_bag"
    with pytest.raises(QDQExportError, match=expected):
        to_qdq(converted, torch.zeros(2, *INPUT))
    with pytest.raises(ExportError, match=expected):  # what the runner catches (deploy.required: false)
        export_files(converted, INPUT, tmp_path, ["onnxruntime"], opset=18)
