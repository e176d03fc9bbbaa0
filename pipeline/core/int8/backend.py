"""The quantization-backend protocol and its registry.

A backend is one object that turns a float model into int8: it inserts fake quantization (`prepare`, for
post-training calibration and quantization-aware training alike), converts the trained fake-quant model into the int8
model that ships (`convert`), writes that model into an artifact and reads it back (`encode`, `decode`), hands the
exporter a module `torch.onnx.export` writes as QDQ (`exportable`), and says what it produced (`int8_weights`,
`float_ops`). What it supports is declared on it, not asked of it by name: `scheme` (the numbers its int8 model
uses, which the per-layer sensitivity probe simulates), `runtimes` (where its exported graph was checked to run) and
`torch_int8_kernels` (whether torch eager runs the converted model on int8 kernels or as reference ops).

What earlier stages impose reaches every backend the same way, as an `Int8Plan`: layers whose weights are INQ's
powers of two keep them exact where int8 can hold them, layers the fallback keeps in floating point stay float.

Everything int8 in the pipeline (the qat stage, its fallback, the sensitivity probe, the evaluator, the exporter)
goes through this module; adding a backend is one file that calls `register_backend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

DEFAULT_BACKEND = "pt2e"


@dataclass(frozen=True)
class Int8Plan:
    """What a backend quantizes, decided by the caller from the model state and the stage config.

    `input_size`: one image's shape (C, H, W), for capture and export. `pow2_layers`: conv / linear layers (module
    names) whose weights are powers of two (INQ's grids): their int8 scale is a power-of-two step below the channel's
    largest magnitude, so the powers of two stay exact integers. `fp32_layers`: conv / linear layers kept in floating
    point (the int8 fallback); their inputs are dequantized and their outputs quantized again for the int8 ops around
    them."""

    input_size: tuple[int, ...]
    pow2_layers: tuple[str, ...] = ()
    fp32_layers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "pow2_layers": list(self.pow2_layers),
                "fp32_layers": list(self.fp32_layers)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Plan:
        return cls(tuple(d["input_size"]), tuple(d.get("pow2_layers", ())), tuple(d.get("fp32_layers", ())))


@dataclass(frozen=True)
class Int8Scheme:
    """The numbers an int8 model uses. Activations: uint8 per tensor with a zero point, in [0, `activation_qmax`].
    Weights: int8 in [`weight_qmin`, `weight_qmax`], symmetric, one scale per output channel. The default is ONNX
    Runtime's `reduce_range` convention, 8-bit activations and 7-bit weights: x86 int8 kernels without VNNI (AVX2)
    sum pairs of u8 x s8 products in 16 bits, which 255 x 64 x 2 cannot overflow; and the full uint8 range lets the
    runtimes drop a ReLU6 before a quantize (ONNX Runtime removes a Clip only when the QuantizeLinear's whole uint8
    range lies inside it), so conv + ReLU6 units (MobileNetV2, EfficientNet-Lite) fuse into int8 kernels. The former
    scheme (7-bit activations, 8-bit weights: PyTorch fbgemm's) left every conv + ReLU6 of tf_efficientnet_lite0 in
    float in ONNX Runtime, 2.7x slower than fp32 (BENCHMARKS.md, "int8 on PT2E"). The observers are torchao's, as
    PyTorch's x86 post-training defaults configure them (a histogram for activations, min / max for weights)."""

    activation_qmax: int = 255
    weight_qmin: int = -64
    weight_qmax: int = 63

    def activation_observer(self) -> nn.Module:
        """An observer of one tensor's range for post-training calibration (`calculate_qparams()` after calls)."""
        from torchao.quantization.pt2e.observer import HistogramObserver

        return HistogramObserver(dtype=torch.uint8, quant_min=0, quant_max=self.activation_qmax)

    def weight_observer(self) -> nn.Module:
        from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

        return PerChannelMinMaxObserver(dtype=torch.int8, quant_min=self.weight_qmin, quant_max=self.weight_qmax,
                                        qscheme=torch.per_channel_symmetric, ch_axis=0)  # fmt: skip

    def fake_quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` rounded to this scheme's int8 grid (per output channel), as floats."""
        observer = self.weight_observer().to(weight.device)
        observer(weight.detach())
        scale, zero_point = observer.calculate_qparams()
        return torch.fake_quantize_per_channel_affine(
            weight, scale.float(), zero_point.int(), 0, self.weight_qmin, self.weight_qmax
        )

    def fake_quantize_activation(self, x: torch.Tensor, qparams: tuple[float, int]) -> torch.Tensor:
        """`x` rounded to the uint8 grid of (scale, zero point)."""
        return torch.fake_quantize_per_tensor_affine(x, qparams[0], qparams[1], 0, self.activation_qmax)


X86_SCHEME = Int8Scheme()


class QuantizationBackend(ABC):
    """One int8 flow. Subclasses set the class attributes and implement the methods; `register_backend(Backend())`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by `python -m pipeline stages`
    scheme: ClassVar[Int8Scheme] = X86_SCHEME
    runtimes: ClassVar[frozenset[str]]  # deploy runtimes its exported QDQ graph is checked to run in
    torch_int8_kernels: ClassVar[bool]  # torch eager runs the converted model on int8 kernels (not reference ops)
    deprecated: ClassVar[str | None] = None  # why not to use it, when it is kept only for comparison

    @abstractmethod
    def prepare(self, model: nn.Module, plan: Int8Plan) -> nn.Module:
        """The fake-quant form of `model` in training mode, sharing `model`'s parameters and BatchNorm statistics."""

    @abstractmethod
    def convert(self, prepared: nn.Module) -> nn.Module:
        """The int8 model of a prepared (calibrated or trained) model, on the CPU in eval mode; `prepared` unchanged."""

    @abstractmethod
    def freeze_(self, prepared: nn.Module, *, observers: bool, bn_stats: bool) -> None:
        """Stop range observers (not rules of the current weights, e.g. powers of two) and/or BatchNorm statistics."""

    @abstractmethod
    def encode(self, converted: nn.Module, plan: Int8Plan) -> dict[str, Any]:
        """The converted model as artifact payload: tensors and plain data only."""

    @abstractmethod
    def decode(self, payload: dict[str, Any], model: nn.Module | None) -> nn.Module:
        """The converted model from `encode`'s payload; `model` is the float structure replayed (None when the
        backend's payload carries its own graph: `self_contained`)."""

    self_contained: ClassVar[bool] = False  # the payload holds the graph: decoding needs no replayed structure

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is an int8 model this backend converted (or decoded)."""

    @abstractmethod
    def is_prepared(self, model: nn.Module) -> bool:
        """Whether `model` carries this backend's fake quantization."""

    @abstractmethod
    def exportable(self, converted: nn.Module, example: torch.Tensor) -> nn.Module:
        """A module `torch.onnx.export(dynamo=True)` writes as a QDQ graph with the int8 model's scales."""

    @abstractmethod
    def int8_weights(self, converted: nn.Module) -> dict[str, torch.Tensor]:
        """Layer (module) name -> its int8 weight values (an int8 tensor, output channel first)."""

    @abstractmethod
    def weight_tensors(self, converted: nn.Module) -> list[torch.Tensor]:
        """The converted model's weights and biases (int8 or float), without quantization parameters: what a
        parameter count counts."""

    @abstractmethod
    def float_ops(self, converted: nn.Module) -> list[str]:
        """Ops that run in floating point between int8 ops (no int8 form for them), as 'name (op)'."""

    @abstractmethod
    def fake_quantizers(self, prepared: nn.Module) -> Iterable[nn.Module]:
        """The fake-quantize modules of a prepared model (each has observer_enabled, disable_observer)."""


_BACKENDS: dict[str, QuantizationBackend] = {}


def register_backend(backend: QuantizationBackend) -> QuantizationBackend:
    """Register `backend` under its name (once); recipes name it in `qat.backend`."""
    if backend.name in _BACKENDS:
        raise ValueError(f"quantization backend {backend.name!r} is registered twice")
    _BACKENDS[backend.name] = backend
    return backend


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend(name: str) -> QuantizationBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown quantization backend {name!r}; known: {', '.join(_BACKENDS) or 'none'}")
    return _BACKENDS[name]


def converted_by(model: nn.Module) -> QuantizationBackend | None:
    """The backend whose int8 model `model` is, or None for a float (or fake-quant) model."""
    return next((b for b in _BACKENDS.values() if b.owns(model)), None)


def prepared_by(model: nn.Module) -> QuantizationBackend | None:
    """The backend whose fake quantization `model` carries, or None."""
    return next((b for b in _BACKENDS.values() if b.is_prepared(model)), None)


def is_int8(model: nn.Module) -> bool:
    """Whether `model` is a converted int8 model (evaluated and exported as such, on the CPU)."""
    return converted_by(model) is not None


def is_fake_quantized(model: nn.Module) -> bool:
    """Whether `model` carries fake quantization (qat's output, until it is converted)."""
    return prepared_by(model) is not None


@contextmanager
def observers_paused(model: nn.Module) -> Iterator[None]:
    """Within the block, the fake quantizers of `model` (if any) quantize without updating their ranges."""
    backend = prepared_by(model)
    quantizers = list(backend.fake_quantizers(model)) if backend is not None else []
    enabled = [q.observer_enabled.clone() for q in quantizers]
    for quantizer in quantizers:
        quantizer.disable_observer()
    try:
        yield
    finally:
        for quantizer, was in zip(quantizers, enabled, strict=True):
            quantizer.observer_enabled.copy_(was)


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str, *, training: bool) -> int:
    """Run `batches` (images) through a prepared model with its observers on; returns how many ran.

    `training`: the forward quantization-aware training runs (BatchNorm on batch statistics unless frozen), so the
    ranges fit what training sees, with BatchNorm's running statistics kept as they were; otherwise eval mode, as
    the int8 model runs. The one calibration every int8 path uses (qat, its fallback, re-quantizing after pruning)."""
    model.train(training)
    statistics = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    statistics += _graph_bn_buffers(model)
    kept = [b.clone() for b in statistics]
    ran = 0
    for images in batches:
        model(images.to(device))
        for buffer, value in zip(statistics, kept, strict=True):
            buffer.copy_(value)  # each batch normalises as the first training step will
        ran += 1
    return ran


def _graph_bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """BatchNorm running statistics a captured graph holds as plain buffers (a torch.export graph has no BatchNorm
    modules): the buffers named running_mean / running_var / num_batches_tracked."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []
    leaves = ("running_mean", "running_var", "num_batches_tracked")
    return [b for name, b in model.named_buffers() if name.rpartition(".")[2] in leaves]
