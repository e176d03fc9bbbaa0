"""The runtime registry: a deployment runtime is one module that registers a `Runtime` (its name, the packages it
needs, the file it loads, how to make that file from the exported ONNX model, how to open it). `onnx_runtime` and
`openvino_runtime` are the built-in ones; a plug-in registers the same way (listed in PIPELINE_PLUGINS), and every
list of runtimes (recipe validation, metric names, reports, the CLI) comes from here.
"""

from __future__ import annotations

import importlib.metadata
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]
"""One batch (float32 NCHW array) in, logits out."""


class ExportError(RuntimeError):
    """A model that does not export to a runtime's format; the message names the module or op."""


@dataclass(frozen=True)
class Runtime:
    """A deployment runtime every stage's model can be exported to and measured in.

    `file`: what it loads, relative to a model's deploy folder (`model.onnx`, `openvino/model.xml`); its companion
    files (`.bin`) share the stem. `convert(onnx_file, folder)`: writes the runtime's files into `folder` (laid out
    as `file` says) from the exported ONNX model; None when it loads the ONNX file itself. `open(file, threads,
    batch_size)`: a `Predict` on the CPU with `threads` intra-op threads, the batch fixed to `batch_size` when given.
    `short`: its name in console tables; `format`: the file format's name for `python -m pipeline export --format`.
    `channel_multiple`: the channel count its CPU kernels work in blocks of (a pruned layer's channels are best a
    multiple of it; `prune: {round_to: auto}` reads it), None when it does not say.
    """

    name: str
    short: str
    format: str
    packages: tuple[str, ...]
    file: str
    open: Callable[[Path, int, int | None], Predict]
    convert: Callable[[Path, Path], None] | None = None
    companions: tuple[str, ...] = ()  # suffixes of the files shipped beside `file`, e.g. (".bin",)
    channel_multiple: int | None = None

    def shipped_files(self, file: Path) -> list[Path]:
        """The files a user ships for this runtime, `file` first."""
        return [file, *(file.with_suffix(suffix) for suffix in self.companions)]


_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime) -> Runtime:
    """Register `runtime` under its name (once)."""
    if runtime.name in _RUNTIMES:
        raise ValueError(f"runtime {runtime.name!r} is registered twice")
    _RUNTIMES[runtime.name] = runtime
    return runtime


def runtime_names() -> tuple[str, ...]:
    """Every registered runtime, in registration order (the built-in ones first)."""
    return tuple(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    if name not in _RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(_RUNTIMES) or 'none'}")
    return _RUNTIMES[name]


def runtime_by_file(file: Path) -> Runtime:
    """The runtime that loads `file` (matched by its path ending as the runtime's `file`)."""
    for runtime in _RUNTIMES.values():
        if Path(file).as_posix().endswith(runtime.file):
            return runtime
    raise ValueError(f"no registered runtime loads {file}")


def open_runtime(runtime: str, file: Path, *, threads: int, batch_size: int | None = None) -> Predict:
    """A function running one batch (float32 NCHW array) through `file` in `runtime` on the CPU.

    `threads`: the runtime's intra-op threads. `batch_size`: fix the batch dimension (OpenVINO compiles a static
    shape, faster); None keeps it dynamic."""
    return get_runtime(runtime).open(Path(file), threads, batch_size)


TORCH_CHANNEL_MULTIPLE = 8
"""What torch's own CPU kernels (oneDNN's blocked layouts on AVX2) block channels by: the multiple without runtimes."""


def channel_multiple(runtimes: list[str]) -> int:
    """The channel multiple that suits every runtime in `runtimes` (their largest declared one; torch's without)."""
    declared = [get_runtime(r).channel_multiple for r in runtimes]
    return max([m for m in declared if m is not None], default=TORCH_CHANNEL_MULTIPLE)


def runtime_versions(runtimes: list[str]) -> dict[str, str]:
    """Installed versions of the runtimes and of the ONNX exporter's packages, for run tags."""
    names = sorted({p for r in runtimes for p in get_runtime(r).packages})
    return {f"{name}_version": importlib.metadata.version(name) for name in names}


def runtime_file_bytes(file: Path) -> int:
    """Bytes a user ships for one runtime: its file and companions (the ONNX file; the IR's .xml plus .bin)."""
    return sum(f.stat().st_size for f in runtime_by_file(file).shipped_files(Path(file)))


def zipped_bytes(file: Path) -> int:
    """Size of the runtime's files in a deflate-compressed zip (zeros of unstructured sparsity compress)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for member in runtime_by_file(file).shipped_files(Path(file)):
            archive.write(member, member.name)
    return buffer.getbuffer().nbytes
