"""INT8 quantization behind one protocol (`backend`): PT2E through torchao (`pt2e`, the default and, since FX graph
mode was retired, the only built-in backend). The qat stage, its fp32 fallback, the sensitivity probe, the evaluator
and the exporter use this package and nothing else; a new backend is one module that calls `register_backend`
(imported here, or listed in PIPELINE_PLUGINS)."""

from pipeline.core.int8.backend import (
    DEFAULT_BACKEND,
    Int8Plan,
    Int8Scheme,
    QuantizationBackend,
    available_backends,
    calibrate_,
    converted_by,
    get_backend,
    is_fake_quantized,
    is_int8,
    observers_paused,
    prepared_by,
    register_backend,
)
from pipeline.core.quiet import quiet_loggers

with quiet_loggers():  # torchao's import logs a pytree registration notice through torch's logger
    from pipeline.core.int8 import pt2e  # noqa: F401  (registers the built-in backend)

__all__ = [
    "DEFAULT_BACKEND",
    "Int8Plan",
    "Int8Scheme",
    "QuantizationBackend",
    "available_backends",
    "calibrate_",
    "converted_by",
    "get_backend",
    "is_fake_quantized",
    "is_int8",
    "observers_paused",
    "prepared_by",
    "register_backend",
]
