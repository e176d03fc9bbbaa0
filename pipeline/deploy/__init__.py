"""What ships: a stage's model exported to the files deployment runtimes load, and those runtimes opened.

- **ONNX** (`model.onnx`, opset `deploy.opset`, batch dimension dynamic) from `torch.onnx.export(dynamo=True)`.
  An fp32 model (dense, structurally pruned, distilled, INQ, unstructured sparse) exports as it is: pruned
  layers are physically smaller; INQ's power-of-two weights are stored exactly; zeros of unstructured
  sparsity are stored and run dense (no runtime here has sparse CPU kernels), so `file_bytes_zip` keeps
  the storage gain visible. An int8 model (the `qat` stage) exports in QDQ form with the scales and zero
  points the torch int8 model holds (its quantization backend's graph, `pipeline.core.int8`): uint8
  activations, int8 per-channel weights.
- **OpenVINO IR** (`openvino/model.xml` + `.bin`), converted from that ONNX file by `openvino.convert_model`,
  weights kept in fp32 (`compress_to_fp16=False`) or int8.

Runtimes are plug-ins (`runtimes`): `onnx_runtime` and `openvino_runtime` register the built-in ones; each is opened
for measurement with a fixed thread count. `measure` measures an exported file in its runtime.
"""

from pipeline.deploy import onnx_runtime, openvino_runtime  # noqa: F401  (register the built-in runtimes)
from pipeline.deploy.config import DeployConfig
from pipeline.deploy.export import PREPROCESSING_FILE, export_files, write_preprocessing
from pipeline.deploy.onnx import ONNX_FILE, export_onnx
from pipeline.deploy.runtimes import (
    ExportError,
    Predict,
    Runtime,
    channel_multiple,
    get_runtime,
    open_runtime,
    register_runtime,
    runtime_file_bytes,
    runtime_names,
    runtime_versions,
    zipped_bytes,
)

__all__ = [
    "ONNX_FILE",
    "PREPROCESSING_FILE",
    "DeployConfig",
    "ExportError",
    "Predict",
    "Runtime",
    "channel_multiple",
    "export_files",
    "export_onnx",
    "get_runtime",
    "open_runtime",
    "register_runtime",
    "runtime_file_bytes",
    "runtime_names",
    "runtime_versions",
    "write_preprocessing",
    "zipped_bytes",
]
