"""Which int8 scheme ships faster: post-training int8 (PT2E) of a recipe's fine-tuned fp32 model under two schemes,
exported to ONNX, measured side by side in ONNX Runtime and OpenVINO against the fp32 file.

- `7a8w`: activations uint8 [0, 127], weights int8 [-128, 127] (PyTorch fbgemm's reduce_range, the former default);
- `8a7w`: activations uint8 [0, 255], weights int8 [-64, 63] (ONNX Runtime's reduce_range, the default since
  2026-12-06). Both keep u8 x s8 pair sums inside the 16 bits AVX2 kernels accumulate in.

Per scheme: how many convolutions each runtime runs in int8 (ONNX Runtime: `QLinearConv` nodes after its graph
optimizations), batch-1 and batch-64 latency (one thread, every file in every runtime once per round, interleaved
rounds, medians), and validation top-1 in both runtimes. Calibration: `--calibration-batches` augmented training
batches, as the qat stage takes them.

    .venv/bin/python bench/int8_scheme.py --recipe transfer/baseline          # the cached fine-tuned baseline
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import load_artifact
from pipeline.core.data.bundle import load_data
from pipeline.core.int8.backend import Int8Plan, Int8Scheme, calibrate_, get_backend
from pipeline.deploy.onnx import export_onnx
from pipeline.recipe import load_recipe
from pipeline.run.find_artifact import resolve_artifact

SCHEMES = {
    "7a8w": Int8Scheme(activation_qmax=127, weight_qmin=-128, weight_qmax=127),
    "8a7w": Int8Scheme(activation_qmax=255, weight_qmin=-64, weight_qmax=63),
}


def int8_files(artifact: Path, bundle, batches: list[torch.Tensor], out: Path) -> dict[str, Path]:
    """The fp32 artifact and its PTQ under each scheme, as ONNX files."""
    backend = get_backend("pt2e")
    files = {"fp32": export_onnx(load_artifact(artifact).eval(), bundle.input_size, out / "fp32.onnx", opset=18)}
    default = type(backend).scheme
    try:
        for name, scheme in SCHEMES.items():
            type(backend).scheme = scheme  # the backend's scheme is a class attribute: the stage reads it there
            plan = Int8Plan(bundle.input_size)
            prepared = backend.prepare(load_artifact(artifact).eval(), plan)
            backend.freeze_(prepared, observers=False, bn_stats=True)
            calibrate_(prepared, batches, "cpu", training=False)
            converted = backend.decode(backend.encode(backend.convert(prepared), plan), None)
            files[name] = export_onnx(converted, bundle.input_size, out / f"{name}.onnx", opset=18)
    finally:
        type(backend).scheme = default
    return files


def sessions(files: dict[str, Path]) -> dict[tuple[str, str], object]:
    """(file, runtime) -> a callable batch -> logits, one thread each."""
    import onnxruntime as ort
    import openvino as ov

    out: dict[tuple[str, str], object] = {}
    core = ov.Core()
    for name, file in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        out[name, "onnxruntime"] = lambda x, s=session, f=feed: s.run(None, {f: x})[0]
        compiled = core.compile_model(core.read_model(str(file)), "CPU", {"INFERENCE_NUM_THREADS": "1"})
        out[name, "openvino"] = lambda x, c=compiled: c([x])[0]
    return out


def int8_convs(file: Path) -> int:
    """QLinearConv nodes in ONNX Runtime's optimized graph of `file` (convolutions it runs in int8)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return sum(node.op_type == "QLinearConv" for node in graph.node)


def latencies(run: dict, input_size: tuple[int, ...], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per call of every (file, runtime) at batch 1 (20 calls a round) and 64 (3 calls a round)."""
    times: dict[str, dict[tuple[str, str], list[float]]] = {"b1": {}, "b64": {}}
    for _ in range(rounds):
        for batch, calls in (("b1", 20), ("b64", 3)):
            x = np.random.randn(1 if batch == "b1" else 64, *input_size).astype(np.float32)
            for key, predict in run.items():
                predict(x)
                start = time.perf_counter()
                for _ in range(calls):
                    predict(x)
                times[batch].setdefault(key, []).append((time.perf_counter() - start) / calls * 1e3)
    return {b: {f"{k[0]} {k[1]}": statistics.median(v) for k, v in t.items()} for b, t in times.items()}


def top1(run: dict, loader) -> dict[str, float]:
    correct: dict[tuple[str, str], int] = {}
    total = 0
    for images, labels in loader:
        x = np.ascontiguousarray(images.numpy())
        for key, predict in run.items():
            correct[key] = correct.get(key, 0) + int((predict(x).argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return {f"{k[0]} {k[1]}": 100 * c / total for k, c in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="transfer/baseline", help="a recipe whose final fp32 model is cached")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    artifact = resolve_artifact(args.recipe, [])
    bundle = load_data(recipe.data, recipe.model, cache_dir=Path(".cache"))
    train = bundle.train_loader(recipe.data.batch_size, seed=0, augment=True)
    batches = [images for images, _ in itertools.islice(iter(train), args.calibration_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        files = int8_files(artifact, bundle, batches, Path(tmp))
        run = sessions(files)
        figures = {"int8_convs_onnxruntime": {name: int8_convs(file) for name, file in files.items()},
                   "latency_ms": latencies(run, bundle.input_size, args.rounds),
                   "val_top1": top1(run, bundle.eval_loader("val", 64))}  # fmt: skip
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
