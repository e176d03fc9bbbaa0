"""`inq: {bits: auto, target_bytes | target_bits}` and per-layer widths (`bits: {pattern: width}`): a bit width per
layer instead of one for the whole model.

1. **Sensitivity.** For every INQ layer and every width in `auto_bits`: the validation top-1 of the model with only
   that layer's weights rounded to its power-of-two levels at that width (INQ's last step, without retraining), on
   `allocation_images` validation images (a fixed random subset), and the packed bytes of its weights at that width.
2. **Allocation.** From every layer at the widest choice, greedy on the marginal predicted drop per byte saved: narrow
   the layer whose next narrower width costs the least top-1 per byte, until the packed weights fit the target
   (`stages.allocation.allocate`; bytes add up exactly, so the target is met and never exceeded).
3. **Prediction.** The chosen widths' drops summed (additive sensitivity) are recorded next to the drop measured with
   every layer rounded at its width at once, before INQ's retraining.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.metrics import predictions
from stages.allocation import LayerNameError, allocate, match_layers

log = logging.getLogger("pipeline")


def packed_bytes(count: int, bits: float) -> int:
    """Bytes of `count` weights packed at `bits` bits each (the inq artifact's layout)."""
    return math.ceil(count * bits / 8)


def widths_from_map(patterns: dict[str, int], layers: dict[str, int], field: str) -> dict[str, int]:
    """Per INQ layer (module name -> weight count), its width from a {pattern: bits} map: the first pattern in the
    map's order that matches it. A pattern matching no layer, or a layer no pattern matches, is an error."""
    matches = match_layers(patterns, list(layers), field)
    widths: dict[str, int] = {}
    for pattern, names in matches.items():
        for name in names:
            widths.setdefault(name, patterns[pattern])
    missing = [n for n in layers if n not in widths]
    if missing:
        raise LayerNameError(field, f"no width for {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                                    "add a pattern for them (e.g. '*': 5 last, for every other layer)")  # fmt: skip
    return widths


@dataclass
class BitAllocation:
    bits: dict[str, int]  # module name -> width
    predicted_drop: float  # the chosen widths' drops, each measured alone, summed
    measured_drop: float  # every layer rounded at its width at once, before retraining, on the same images
    weight_bytes: int  # the packed weights at these widths
    evaluations: int

    def metrics(self) -> dict[str, float]:
        out = {
            "allocation_predicted_drop": self.predicted_drop,
            "allocation_measured_drop": self.measured_drop,
            "allocation_evaluations": float(self.evaluations),
        }
        return out | {f"allocation_bits.{name}": float(bits) for name, bits in self.bits.items()}


def allocate_bits(
    model: nn.Module,
    layers: dict[str, nn.Module],
    target_bytes: int,
    choices: tuple[int, ...],
    rounded,
    loader,
) -> BitAllocation:
    """Measure each INQ layer's (`layers`, by module name) drop at every width in `choices` and choose widths whose
    packed weights fit `target_bytes` at the smallest predicted drop. `rounded(weight, bits)` is the layer's weight
    after INQ at `bits` (the stage's level-set rule)."""
    counts = {n: m.weight.numel() for n, m in layers.items()}
    widest, narrowest = max(choices), min(choices)
    smallest = sum(packed_bytes(c, narrowest) for c in counts.values())
    if target_bytes < smallest:
        raise ValueError(
            f"inq: target of {target_bytes:,} bytes is below the packed weights at {narrowest} bits in every layer "
            f"({smallest:,} bytes); raise it or allow narrower widths in auto_bits"
        )
    model.eval()
    base_top1 = predictions(model, loader).top1
    # step s stands for width widest - s, so that allocate's steps (0 = unchanged) narrow a layer
    drops: dict[str, dict[float, float]] = {n: {} for n in layers}
    saved: dict[str, dict[float, float]] = {n: {} for n in layers}
    for name, layer in layers.items():
        for bits in choices:
            with weight_replaced(layer, rounded(layer.weight.detach(), bits)):
                drops[name][float(widest - bits)] = base_top1 - predictions(model, loader).top1
            saved[name][float(widest - bits)] = packed_bytes(counts[name], widest) - packed_bytes(counts[name], bits)
    log.info("inq: sensitivity of %d layers x %d widths measured", len(layers), len(choices))

    def size(steps: dict[str, float]) -> float:
        return sum(packed_bytes(c, widest - int(steps.get(n, 0))) for n, c in counts.items())

    steps = allocate(drops, saved, size, target_bytes, size({}))
    bits = {n: widest - int(steps.get(n, 0)) for n in layers}
    allocated = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, layer in allocated.named_modules():
            if name in bits:
                layer.weight.copy_(rounded(layer.weight.detach(), bits[name]))
    return BitAllocation(
        bits=bits,
        predicted_drop=sum(drops[n][float(widest - b)] for n, b in bits.items()),
        measured_drop=base_top1 - predictions(allocated, loader).top1,
        weight_bytes=int(size(steps)),
        evaluations=len(layers) * len(choices) + 2,
    )


@contextmanager
def weight_replaced(layer: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """Within the block, `layer.weight` holds `value`; its own value comes back on exit."""
    kept = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(kept)
