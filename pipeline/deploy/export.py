"""Exporting a stage's model for its runtimes: the ONNX file once, then each runtime's own files from it, written in a
temporary folder and moved into place; and `preprocessing.json` beside them (the input the model expects)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from pipeline.deploy.onnx import ONNX_FILE, export_onnx
from pipeline.deploy.runtimes import get_runtime


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

    The ONNX file (`model.onnx`) is written once; each runtime with a converter (OpenVINO: `openvino/model.xml`)
    converts it into its own files. Files are written in a temporary folder and moved into place, so a crash
    leaves no half-written file; only these files are replaced in `out_dir`. `reuse`: keep existing files
    (exports are deterministic given the artifact, so the stage cache reuses them)."""
    out_dir = Path(out_dir)
    files = {r: out_dir / get_runtime(r).file for r in runtimes}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_preprocessing(model, out_dir)
    if reuse and all(f.is_file() for f in files.values()):
        return files
    tmp = out_dir / f".export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        export_onnx(model, input_size, tmp / ONNX_FILE, opset=opset)
        for runtime in map(get_runtime, runtimes):
            if runtime.convert is None:
                continue
            top = Path(runtime.file).parts[0]  # the runtime's own folder (or file) in the deploy folder
            runtime.convert(tmp / ONNX_FILE, tmp)
            shutil.rmtree(out_dir / top, ignore_errors=True)
            os.replace(tmp / top, out_dir / top)
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
