"""`qat: {fp32_layers: auto, max_drop}` (or an explicit list): int8 everywhere but in the layers that lose the most
accuracy for the least compute, which stay in floating point.

1. **Sensitivity.** For every conv and linear layer: the validation top-1 of the model with only that layer in int8
   (its weights per output channel symmetric int8, its input activations uint8 per tensor, ranges calibrated on
   training batches in eval mode, as the quantization backend's `Int8Scheme` says), without training, on
   `allocation_images` validation images, and the layer's MACs per image.
2. **Fallback.** The predicted drop of int8 everywhere is the drops summed; layers leave int8, most drop per MAC first
   (a depthwise convolution or the stem costs few MACs in floating point), until the predicted drop is at most
   `max_drop` (`stages.allocation.keep_float`).
3. **Prediction.** The drops of the layers left in int8 summed are recorded next to the drop measured with all of
   them in int8 at once (the same simulation, before QAT trains), so a user sees how far the additive prediction holds.

In the model that ships, the backend leaves those layers float: their input is dequantized and their output quantized
again for the int8 ops around them, and their weights are never quantized (`Int8Plan.fp32_layers`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.int8 import Int8Scheme
from pipeline.core.metrics import predictions
from stages.allocation import keep_float, match_layers
from stages.channels import PRUNABLE

log = logging.getLogger("pipeline")

ActivationRange = tuple[float, int]  # scale and zero point of a layer's uint8 input


def weighted_layers(model: nn.Module) -> list[str]:
    """The conv and linear layers int8 quantizes, by module name, in model order."""
    return [n for n, m in model.named_modules() if n and isinstance(m, PRUNABLE)]


def explicit_fp32_layers(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The layers an explicit `fp32_layers` list names (names or globs), in model order; a pattern matching no layer
    is refused."""
    names = weighted_layers(model)
    matched = {n for found in match_layers(patterns, names, "fp32_layers").values() for n in found}
    return [n for n in names if n in matched]


def layer_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates per image of every conv and linear layer (one forward on a zero image)."""
    macs: dict[str, int] = {}

    def count(name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            per_output = module.weight.numel() // module.weight.shape[0]
            macs[name] = int(output.numel() // output.shape[0]) * per_output

        return hook

    layers = {n: model.get_submodule(n) for n in weighted_layers(model)}
    hooks = [layer.register_forward_hook(count(n)) for n, layer in layers.items()]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def activation_ranges(
    model: nn.Module, names: list[str], batches: list[torch.Tensor], scheme: Int8Scheme
) -> dict[str, ActivationRange]:
    """The uint8 ranges of the inputs of layers `names` of `model`, observed on `batches` in eval mode (one pass for
    all of them) with `scheme`'s post-training activation observer."""
    observers = {name: scheme.activation_observer() for name in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, inputs, o=observers[n]: o(inputs[0]))
             for n in names]  # fmt: skip
    try:
        model.eval()
        with torch.inference_mode():
            for images in batches:
                model(images)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, obs in observers.items():
        scale, zero_point = obs.calculate_qparams()
        out[name] = (float(scale), int(zero_point))
    return out


@contextmanager
def int8_alone(layer: nn.Module, input_range: ActivationRange, scheme: Int8Scheme) -> Iterator[nn.Module]:
    """Within the block `layer` computes as in int8 under `scheme`: weights rounded per output channel, inputs per
    tensor to `input_range`; its weights and forward come back on exit."""
    weight = layer.weight.detach()
    rounded = scheme.fake_quantize_weight(weight)
    hook = layer.register_forward_pre_hook(
        lambda _m, inputs: (scheme.fake_quantize_activation(inputs[0], input_range),)
    )
    kept = weight.clone()
    with torch.no_grad():
        layer.weight.copy_(rounded)
    try:
        yield layer
    finally:
        hook.remove()
        with torch.no_grad():
            layer.weight.copy_(kept)


@dataclass
class Fallback:
    layers: list[str]  # kept in floating point, model order
    predicted_drop: float  # the int8 layers' drops, each measured alone, summed
    measured_drop: float  # every int8 layer in int8 at once (same simulation), before training, on the same images
    int8_predicted_drop: float  # int8 everywhere, predicted the same way
    fp32_macs_share: float  # of the model's conv / linear MACs left in floating point
    evaluations: int

    def metrics(self) -> dict[str, float]:
        return {
            "allocation_predicted_drop": self.predicted_drop,
            "allocation_measured_drop": self.measured_drop,
            "allocation_int8_predicted_drop": self.int8_predicted_drop,
            "allocation_fp32_macs_share": self.fp32_macs_share,
            "allocation_evaluations": float(self.evaluations),
        }


def choose_fp32_layers(
    model: nn.Module,
    max_drop: float,
    loader,
    calibration: list[torch.Tensor],
    input_size: tuple[int, ...],
    scheme: Int8Scheme,
    device: torch.device | str = "cpu",
) -> Fallback:
    """Measure every layer's int8 drop (under `scheme`) and MACs and keep in floating point the fewest MACs that bring
    the predicted drop within `max_drop` (points of top-1)."""
    names = weighted_layers(model)
    macs = layer_macs(model, input_size)
    ranges = activation_ranges(model, names, calibration, scheme)
    top1 = lambda: predictions(model.eval(), loader, device=device).top1  # noqa: E731
    base_top1 = top1()
    drops = {}
    for name in names:
        with int8_alone(model.get_submodule(name), ranges[name], scheme):
            drops[name] = base_top1 - top1()
    kept = set(keep_float(drops, macs, max_drop))
    with ExitStack() as stack:
        for name in names:
            if name not in kept:
                stack.enter_context(int8_alone(model.get_submodule(name), ranges[name], scheme))
        measured = base_top1 - top1()
    total_macs = sum(macs.values())
    return Fallback(
        layers=[n for n in names if n in kept],
        predicted_drop=sum(d for n, d in drops.items() if n not in kept),
        measured_drop=measured,
        int8_predicted_drop=sum(drops.values()),
        fp32_macs_share=sum(macs[n] for n in kept) / total_macs if total_macs else 0.0,
        evaluations=len(names) + 2,
    )
