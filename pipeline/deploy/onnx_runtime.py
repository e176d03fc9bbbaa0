"""ONNX Runtime as a deployment runtime: it loads the exported ONNX file itself, on the CPU execution provider, with
every graph optimisation (it fuses QDQ into its U8S8 int8 kernels)."""

from __future__ import annotations

from pathlib import Path

from pipeline.deploy.onnx import ONNX_FILE
from pipeline.deploy.runtimes import Predict, Runtime, register_runtime


def open_file(file: Path, threads: int, batch_size: int | None = None) -> Predict:
    """`batch_size` is unused: the session keeps the batch dimension dynamic."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


ONNX_RUNTIME = register_runtime(Runtime(
    name="onnxruntime", short="ort", format="onnx", packages=("onnx", "onnxscript", "onnxruntime"), file=ONNX_FILE,
    open=open_file, channel_multiple=8,  # NCHWc blocks of 8 (AVX2; 16 with AVX-512): measured, BENCHMARKS.md
))  # fmt: skip
