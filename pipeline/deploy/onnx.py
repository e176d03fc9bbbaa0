"""The ONNX file every runtime starts from (`model.onnx`, opset `deploy.opset`, batch dimension dynamic), written by
`torch.onnx.export(dynamo=True)`. An fp32 model exports as it is: pruned layers are physically smaller, INQ's
power-of-two weights are stored exactly, zeros of unstructured sparsity are stored and run dense. An int8 model (the
`qat` stage) exports in QDQ form with the scales and zero points the torch int8 model holds: its quantization
backend hands the exporter a module whose quantize / dequantize ops become QuantizeLinear / DequantizeLinear
(`QuantizationBackend.exportable`).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.deploy.runtimes import ExportError

ONNX_FILE = "model.onnx"


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
    from pipeline.core.int8 import converted_by

    model = model.eval()
    example = torch.zeros(2, *input_size)
    backend = converted_by(model)
    if backend is not None:
        try:
            model = backend.exportable(model, example)
        except Exception as err:
            raise ExportError(f"int8 ({backend.name}): {err}") from err
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
