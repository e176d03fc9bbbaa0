"""What ships: a stage's model exported to the files deployment runtimes load, and those runtimes opened.

- **ONNX** (`model.onnx`, opset `deploy.opset`, batch dimension dynamic) from `torch.onnx.export(dynamo=True)`.
  An fp32 model (dense, structurally pruned, distilled, INQ, unstructured sparse) exports as it is: pruned
  layers are physically smaller; INQ's power-of-two weights are stored exactly; zeros of unstructured
  sparsity are stored and run dense (no runtime here has sparse CPU kernels), so `file_bytes_zip` keeps
  the storage gain visible. An int8 model (the `qat` stage) exports in QDQ form with the scales and zero
  points the torch int8 model holds (`pipeline.deploy.qdq`): uint8 activations, int8 per-channel weights.
- **OpenVINO IR** (`openvino/model.xml` + `.bin`), converted from that ONNX file by `openvino.convert_model`,
  weights kept in fp32 (`compress_to_fp16=False`) or int8.

Runtimes are opened for measurement with a fixed thread count; OpenVINO's CPU plugin is pinned to fp32
inference precision, because on CPUs with AVX512_BF16 or AMX it would silently compute fp32 models in bf16.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from pipeline.core.config import StrictConfig

log = logging.getLogger("pipeline")

Runtime = Literal["onnxruntime", "openvino"]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")
# The Python packages each runtime needs, to export for it and to run it.
RUNTIME_PACKAGES = {
    "onnxruntime": ("onnx", "onnxscript", "onnxruntime"),
    "openvino": ("onnx", "onnxscript", "openvino"),
}
ONNX_FILE, OPENVINO_DIR, OPENVINO_XML = "model.onnx", "openvino", "model.xml"


class DeployConfig(StrictConfig):
    """Which deployment runtimes every stage's model is exported to and measured in (`deploy:` in a recipe)."""

    runtimes: list[Runtime] = Field(
        default_factory=lambda: list(RUNTIMES),
        description="runtimes to export to and evaluate in, in order of preference (the first is the report's "
        "default); [] measures torch only",
    )
    threads: int = Field(1, ge=1, le=256, description="runtime threads for batch-1 latency and batch throughput")
    required: bool = Field(
        True, description="a model that does not export fails the stage; false: the chain goes on, error recorded"
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the exported file")

    @field_validator("runtimes")
    @classmethod
    def _unique_and_installed(cls, runtimes: list[str]) -> list[str]:
        if len(set(runtimes)) != len(runtimes):
            raise ValueError(f"lists a runtime twice: {runtimes}")
        for runtime in runtimes:
            missing = [p for p in RUNTIME_PACKAGES[runtime] if importlib.util.find_spec(p) is None]
            if missing:
                raise ValueError(
                    f"{runtime} needs the Python package(s) {', '.join(missing)}, which are not installed "
                    f"(`make` installs them; or remove {runtime!r} from deploy.runtimes)"
                )
        return runtimes


class ExportError(RuntimeError):
    """A model that does not export to a runtime's format; the message names the module or op."""


def runtime_versions(runtimes: list[str]) -> dict[str, str]:
    """Installed versions of the runtimes and of the ONNX exporter's packages, for run tags."""
    names = sorted({p for r in runtimes for p in RUNTIME_PACKAGES[r]})
    return {f"{name}_version": importlib.metadata.version(name) for name in names}


# --- export ----------------------------------------------------------------------------------------


def _export_failure(err: BaseException) -> str:
    """One line naming what failed: the exporter's own summary line, else the error's first line."""
    text = str(err)
    summary = re.search(r"## Exception summary\s*\n\s*\n?(.+)", text)
    line = summary.group(1) if summary else next((s for s in text.splitlines() if s.strip()), type(err).__name__)
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    line = re.sub(r"^<class '[\w.]+'>: ", "", line)
    op = re.search(r"aten[._:]+[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", text)
    return f"{line}{f' (op {op.group(0)})' if op and op.group(0) not in line else ''}"[:500]


def export_onnx(model: nn.Module, input_size: tuple[int, ...], path: Path, *, opset: int) -> Path:
    """Write `model` (an artifact as loaded by `load_artifact`, fp32 or int8) as ONNX with a dynamic batch axis."""
    from pipeline.core.metrics import is_quantized_model
    from pipeline.deploy.qdq import QDQExportError, to_qdq

    model = model.eval()
    example = torch.zeros(2, *input_size)
    if is_quantized_model(model):
        try:
            model = to_qdq(model, example)
        except QDQExportError as err:
            raise ExportError(str(err)) from err
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                optimize=False,
                verbose=False,
            )
            _fold_constants_(program.model)
            program.save(str(path), external_data=False)
    except Exception as err:
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {_export_failure(err)}") from err
    return path


def _fold_constants_(model) -> None:
    """The exporter's clean-up (constant folding, constants as initializers, deduplication) without its rewrite
    rules: those also fuse BatchNorm into the preceding convolution, which would turn INQ's exact powers of two
    into arbitrary floats in the file. The runtimes fold BatchNorm themselves when they load it."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    for step in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
    ):
        step(model)


class _quiet_exporter:
    """The dynamo exporter logs every step at INFO and prints a progress line per stage; keep it to errors."""

    def __enter__(self):
        self.levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir"):
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        return False


def export_openvino(onnx_path: Path, out_dir: Path) -> Path:
    """Convert an exported ONNX file to OpenVINO IR in `out_dir`; returns the .xml path."""
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        ov_model = ov.convert_model(str(onnx_path))
        xml = out_dir / OPENVINO_XML
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    except Exception as err:
        raise ExportError(f"OpenVINO conversion failed: {str(err).strip().splitlines()[0][:400]}") from err
    return xml


def export_files(
    model: nn.Module,
    input_size: tuple[int, ...],
    out_dir: Path,
    runtimes: list[str],
    *,
    opset: int,
    reuse: bool = True,
) -> dict[str, Path]:
    """Export for every runtime in `runtimes` into `out_dir`; returns {runtime: the file it loads}.

    ONNX Runtime loads `model.onnx`; OpenVINO its IR (`openvino/model.xml`), converted from that ONNX file.
    Files are written in a temporary folder and moved into place, so a crash leaves no half-written file;
    only these files are replaced in `out_dir`. `reuse`: keep existing files (exports are deterministic
    given the artifact, so the stage cache reuses them)."""
    out_dir = Path(out_dir)
    files = {r: _runtime_file(out_dir, r) for r in runtimes}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_preprocessing(model, out_dir)
    if reuse and all(f.is_file() for f in files.values()):
        return files
    tmp = out_dir / f".export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        export_onnx(model, input_size, tmp / ONNX_FILE, opset=opset)
        if "openvino" in runtimes:
            export_openvino(tmp / ONNX_FILE, tmp / OPENVINO_DIR)
            shutil.rmtree(out_dir / OPENVINO_DIR, ignore_errors=True)
            os.replace(tmp / OPENVINO_DIR, out_dir / OPENVINO_DIR)
        os.replace(tmp / ONNX_FILE, out_dir / ONNX_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def write_preprocessing(model: nn.Module, out_dir: Path) -> Path | None:
    """`preprocessing.json` beside the exported files: the input the model expects (its artifact's `pretrained_cfg`:
    input size, mean and std on a 0..1 scale, resize interpolation, centre-crop share), so that whoever deploys the
    files feeds them what they were evaluated with. None when the model records none."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shown = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PREPROCESSING_KEYS}
    if not shown:
        return None
    path = Path(out_dir) / PREPROCESSING_FILE
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(shown, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _runtime_file(out_dir: Path, runtime: str) -> Path:
    return out_dir / ONNX_FILE if runtime == "onnxruntime" else out_dir / OPENVINO_DIR / OPENVINO_XML


def runtime_file_bytes(file: Path) -> int:
    """Bytes a user ships for one runtime: the ONNX file, or the IR's .xml plus .bin."""
    if file.suffix == ".xml":
        return file.stat().st_size + file.with_suffix(".bin").stat().st_size
    return file.stat().st_size


def zipped_bytes(file: Path) -> int:
    """Size of the runtime's files in a deflate-compressed zip (zeros of unstructured sparsity compress)."""
    import io

    members = [file, file.with_suffix(".bin")] if file.suffix == ".xml" else [file]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for member in members:
            archive.write(member, member.name)
    return buffer.getbuffer().nbytes


# --- runtimes ------------------------------------------------------------------------------------

Predict = Callable[[np.ndarray], np.ndarray]


def open_runtime(runtime: str, file: Path, *, threads: int, batch_size: int | None = None) -> Predict:
    """A function running one batch (float32 NCHW array) through `file` in `runtime` on the CPU.

    `threads`: the runtime's intra-op threads. `batch_size`: fix the batch dimension (OpenVINO compiles a static
    shape, faster); None keeps it dynamic."""
    if runtime == "onnxruntime":
        return _open_onnxruntime(file, threads)
    if runtime == "openvino":
        return _open_openvino(file, threads, batch_size)
    raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")


def _open_onnxruntime(file: Path, threads: int) -> Predict:
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


def _open_openvino(file: Path, threads: int, batch_size: int | None) -> Predict:
    import openvino as ov

    core = ov.Core()
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


__all__ = [
    "DeployConfig",
    "ExportError",
    "RUNTIMES",
    "export_files",
    "export_onnx",
    "export_openvino",
    "open_runtime",
    "runtime_file_bytes",
    "runtime_versions",
    "zipped_bytes",
]
