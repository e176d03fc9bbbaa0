"""OpenVINO as a deployment runtime: its IR (`openvino/model.xml` + `.bin`) converted from the exported ONNX file by
`openvino.convert_model`, weights kept in fp32 (`compress_to_fp16=False`) or int8; opened on the CPU plugin pinned to
fp32 inference precision, because on CPUs with AVX512_BF16 or AMX it would silently compute fp32 models in bf16."""

from __future__ import annotations

import functools
from pathlib import Path

from pipeline.deploy.runtimes import ExportError, Predict, Runtime, register_runtime

OPENVINO_DIR, OPENVINO_XML = "openvino", "model.xml"


def convert(onnx_path: Path, folder: Path) -> None:
    """Convert an exported ONNX file to OpenVINO IR in `folder/openvino/`."""
    import openvino as ov

    out_dir = folder / OPENVINO_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(ov.convert_model(str(onnx_path)), str(out_dir / OPENVINO_XML), compress_to_fp16=False)
    except Exception as err:
        raise ExportError(f"OpenVINO conversion failed: {str(err).strip().splitlines()[0][:400]}") from err


@functools.cache
def _core():
    """One OpenVINO Core per process, as OpenVINO advises: a Core per file loaded and unloaded the CPU plugin with
    every measurement, and after tests/pipeline/run/test_speed.py (eight files opened) and a few other test modules
    in one process, a later, unrelated call crashed (SIGSEGV in the suite's pytest worker)."""
    import openvino as ov

    return ov.Core()


def open_file(file: Path, threads: int, batch_size: int | None) -> Predict:
    import openvino as ov

    core = _core()
    model = core.read_model(str(file))
    if batch_size is not None:
        shape = list(model.input(0).get_partial_shape())
        shape[0] = batch_size
        model.reshape({model.input(0).any_name: ov.PartialShape(shape)})
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",  # else bf16 on AVX512_BF16 / AMX CPUs
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda x: request.infer({0: x})[output]


OPENVINO = register_runtime(Runtime(
    name="openvino", short="ov", format="openvino", packages=("onnx", "onnxscript", "openvino"),
    file=f"{OPENVINO_DIR}/{OPENVINO_XML}", open=open_file, convert=convert, companions=(".bin",),
    channel_multiple=8,  # nChw8c blocks (AVX2; nChw16c with AVX-512): measured, BENCHMARKS.md
))  # fmt: skip
