"""Training numerics: what `precision: auto` and `channels_last: auto` resolve to on a device, and the autocast /
gradient-scaler pair the shared loop trains with.

`auto` picks what was measured faster at equal accuracy (BENCHMARKS.md, issue #23): bf16 autocast with channels_last
memory format on CUDA and on CPUs with native bf16 arithmetic (AVX512_BF16 or AMX), plain fp32 in NCHW elsewhere,
where bf16 is emulated and slower. Whatever it picks, the weights themselves stay fp32 (autocast computes convolutions
and matrix products in bf16 from fp32 master weights), so every projection onto fixed values (pruned zeros, INQ's
powers of two) is exact. A fake-quantized model (qat and every stage after it) always trains in fp32: its observers
and fake quantization must see the numbers the int8 model will compute.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]
PrecisionSetting = Literal["auto", "fp32", "bf16", "fp16"]
ChannelsLastSetting = Literal["auto"] | bool
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why): CUDA with bf16 support; a CPU with AMX or AVX512_BF16."""
    if device.type == "cuda":
        return (True, "CUDA") if torch.cuda.is_bf16_supported() else (False, "this CUDA device has no bf16")
    if device.type != "cpu":
        return False, f"{device.type} is not measured"
    if torch.cpu._is_amx_tile_supported():
        return True, "the CPU has AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "the CPU has AVX512_BF16"
    return False, "the CPU has no AVX512_BF16 or AMX (bf16 would be emulated)"


@dataclass(frozen=True)
class Numerics:
    """What one training run computes in: autocast precision and memory format, and why (for the log)."""

    precision: Precision = "fp32"
    channels_last: bool = False
    why: str = ""

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return DTYPES.get(self.precision)

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The forward's autocast context (a no-op for fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A gradient scaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
        return torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        text = f"{self.precision}{', channels_last' if self.channels_last else ''}"
        return f"{text} ({self.why})" if self.why else text


def auto_context(device: torch.device) -> dict[str, object]:
    """What `auto` settings depend on besides the model: the device type and whether it computes bf16 natively.
    Part of every cache key, so a model trained where auto meant bf16 is never served where it means fp32."""
    return {"device": device.type, "fast_bf16": fast_bf16(device)[0]}


def resolve_numerics(
    precision: PrecisionSetting,
    channels_last: ChannelsLastSetting,
    device: torch.device,
    *,
    fp32_only: bool = False,
    hazards: list[str] | None = None,
) -> Numerics:
    """The concrete numerics of a training config on `device`.

    `fp32_only`: the model is fake-quantized, which trains in fp32; an explicit bf16 / fp16 is then an error and
    `auto` resolves to fp32. `hazards`: layers whose reduced-precision backward this device gets wrong
    (`cpu_autocast_hazards`); an explicit bf16 / fp16 is then an error and `auto` resolves to fp32.
    """
    fast, why = fast_bf16(device)
    if fp32_only and precision in DTYPES:
        raise ValueError(
            f"precision: {precision} cannot train a fake-quantized model (qat and the stages after it train in fp32, "
            "so the int8 model computes what training saw); use precision: auto or fp32"
        )
    if hazards and precision in DTYPES:
        raise ValueError(f"precision: {precision} would train with NaN gradients here: {_hazard_text(hazards)}; "
                         "use precision: auto (fp32 for this model on this device) or fp32")  # fmt: skip
    if precision == "auto":
        if fp32_only:
            precision, why = "fp32", "fake quantization trains in fp32"
        elif fast and hazards:
            precision, why = "fp32", f"bf16 would give NaN gradients: {_hazard_text(hazards)}"
        elif fast:
            precision = "bf16"
        elif device.type == "cuda":
            precision = "fp16"
        else:
            precision = "fp32"
        why = f"auto: {why}"
    else:
        why = ""
    if channels_last == "auto":
        channels_last = fast and not fp32_only
    return Numerics(precision, bool(channels_last), why)


def _hazard_text(hazards: list[str]) -> str:
    more = f" and {len(hazards) - 3} more" if len(hazards) > 3 else ""
    return f"{', '.join(hazards[:3])}{more} ({CPU_BF16_CONV_BUG})"


CPU_BF16_CONV_BUG = (
    "torch 2.14's CPU kernels leave part of the weight gradient of a padded convolution unwritten, so it holds "
    "whatever memory held (NaN at times), when the convolution's input is smaller than its stride in a dimension"
)


def cpu_autocast_hazards(model: nn.Module, input_size: tuple[int, ...]) -> list[str]:
    """Convolutions of `model` whose reduced-precision backward is wrong on the CPU at this input size: padded ones
    whose input is smaller than their stride in some spatial dimension (found here, BENCHMARKS.md #23; e.g. a 16-px
    input reaches a ResNet's last stride-2 block at 1x1). One forward at batch 1 finds their input sizes."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def check(module: nn.Module, inputs, _output) -> None:
        spatial, stride = inputs[0].shape[2:], module.stride
        padding = module.padding if not isinstance(module.padding, str) else (
            tuple(k // 2 for k in module.kernel_size) if module.padding == "same" else (0,) * len(stride))  # fmt: skip
        if any(p > 0 and n < s for n, s, p in zip(spatial, stride, padding, strict=False)):
            found.append(f"{names[module]} ({'x'.join(map(str, spatial))} input, stride {'x'.join(map(str, stride))})")

    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed]
    hooks = [m.register_forward_hook(check) for m in convs]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return found


def is_fake_quantized(model: nn.Module) -> bool:
    """Whether `model` carries fake quantization (qat's output): it trains in fp32."""
    from pipeline.core.int8 import is_fake_quantized as fake_quantized

    return fake_quantized(model)
