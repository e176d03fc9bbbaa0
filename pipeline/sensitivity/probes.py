"""One technique applied to one layer alone, without retraining: the probes a sensitivity analysis runs.

A probe is a context manager `probe(model, layer, setting, ctx)` that yields the changed model and what the
change saves, and leaves `model` as it was on exit. Each technique registers one probe (`register_probe`); a new
technique is one function here.

- `prune`: structured pruning of `setting` of the layer's output channels by the prune stage's criterion
  (torch-pruning's dependency graph, so channels coupled to them, e.g. through a residual sum, go too). It works
  on a copy; what it saves (parameters, MACs) is counted on the whole model before and after.
- `int8`: the layer's weights per output channel symmetric int8 and its input activations uint8 per tensor, with
  the post-training observers of the default quantization backend's `Int8Scheme`; activation ranges are calibrated
  on training batches. Per-channel symmetric rounding does not change when BatchNorm's per-channel scale is folded
  in, so the unfolded weight rounds as the deployed one does.
- `inq`: the layer's weights all rounded to INQ's power-of-two levels at `setting` bits (the stage's n1 rule:
  the paper's, from the largest weight), as INQ's last step leaves them before any retraining.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.core.int8 import DEFAULT_BACKEND, Int8Scheme, get_backend
from pipeline.core.metrics import count_macs, count_params
from pipeline.sensitivity.config import SensitivityConfig, SensitivityError
from stages.channels import PRUNABLE, classifier, prune_layer_channels_
from stages.inq_allocation import weight_replaced
from stages.pow2 import round_layer
from stages.qat_fallback import activation_ranges, int8_alone

LAYER_TYPES = PRUNABLE
"""The layers a sensitivity analysis changes: convolutions and linear layers."""


@dataclass
class ProbeContext:
    """What probes share over one analysis: the input size, the pruning criterion, int8's calibrated ranges."""

    input_size: tuple[int, ...]
    importance: str = "group_norm"
    # layer name -> (scale, zero point) of its uint8 input activations, and the int8 numbers simulated (the default
    # quantization backend's)
    activation_ranges: dict[str, tuple[float, int]] = field(default_factory=dict)
    int8_scheme: Int8Scheme = field(default_factory=lambda: get_backend(DEFAULT_BACKEND).scheme)
    # (parameters, MACs) of the unchanged model, counted by the first pruning probe
    base_size: tuple[int, int] | None = None


@dataclass
class Effect:
    """What a probe's change saves: parameters and MACs removed (pruning), bytes of weights saved (both);
    `coupled`: the other layers the change reached (pruning's coupled channels)."""

    params_removed: int = 0
    macs_removed: int = 0
    bytes_saved: int = 0
    coupled: tuple[str, ...] = ()


Probe = Callable[[nn.Module, str, float, ProbeContext], AbstractContextManager[tuple[nn.Module, Effect]]]


# Once per analysis, before a technique's first cell: (the unchanged model, the layers it will probe, training
# batches, the context), e.g. int8 calibrates its layers' input ranges.
Setup = Callable[[nn.Module, list[str], list[torch.Tensor], "ProbeContext"], None]


@dataclass(frozen=True)
class ProbeEntry:
    probe: Probe
    settings: Callable[[SensitivityConfig], tuple[float, ...]]  # the grid's settings of this technique
    label: Callable[[float], str]  # a setting's column name in tables and plots
    setup: Setup | None = None
    skips_classifier: bool = False  # the technique cannot change the classifier (pruning: one output per class)


_PROBES: dict[str, ProbeEntry] = {}


def register_probe(
    technique: str,
    settings: Callable[[SensitivityConfig], tuple[float, ...]],
    label: Callable[[float], str],
    *,
    setup: Setup | None = None,
    skips_classifier: bool = False,
) -> Callable[[Probe], Probe]:
    """Register `probe` for `technique`, with the settings a config asks of it, how a setting is named, what it needs
    set up once per analysis (`setup`), and whether it leaves the classifier alone."""

    def wrap(fn: Probe) -> Probe:
        _PROBES[technique] = ProbeEntry(fn, settings, label, setup, skips_classifier)
        return fn

    return wrap


def get_probe(technique: str) -> ProbeEntry:
    if technique not in _PROBES:
        raise SensitivityError(f"no sensitivity probe for {technique!r}; known: {', '.join(_PROBES)}")
    return _PROBES[technique]


def grid(config: SensitivityConfig) -> list[tuple[str, float]]:
    """Every (technique, setting) the config asks for, techniques in registration order."""
    for technique in config.techniques:
        get_probe(technique)  # unknown names are refused
    return [(t, s) for t in _PROBES if t in config.techniques for s in _PROBES[t].settings(config)]


def setting_label(technique: str, setting: float) -> str:
    """'prune 50%', 'int8', 'inq 4b': a grid column's name."""
    return get_probe(technique).label(setting)


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """Every convolution and linear layer with a weight, by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and n}


def applies(technique: str, model: nn.Module, name: str) -> bool:
    """Whether `technique` can change layer `name` (a technique that `skips_classifier` leaves the classifier)."""
    return not (get_probe(technique).skips_classifier and model.get_submodule(name) is classifier(model))


# --- prune -----------------------------------------------------------------------------------------


@register_probe("prune", lambda c: c.prune_ratios, lambda r: f"prune {r:.0%}", skips_classifier=True)
@contextmanager
def prune_probe(model: nn.Module, name: str, ratio: float, ctx: ProbeContext) -> Iterator[tuple[nn.Module, Effect]]:
    pruned = copy.deepcopy(model).eval()
    coupled = prune_layer_channels_(pruned, name, ratio, ctx.importance, ctx.input_size)
    if ctx.base_size is None:
        ctx.base_size = (count_params(model), count_macs(model, ctx.input_size))
    params, macs = ctx.base_size
    removed = params - count_params(pruned)
    yield pruned, Effect(removed, macs - count_macs(pruned, ctx.input_size), 4 * removed, coupled)


# --- int8 ------------------------------------------------------------------------------------------


def calibrate_activations_(model: nn.Module, names: list[str], batches: list[torch.Tensor], ctx: ProbeContext) -> None:
    """Observe the inputs of layers `names` of the unchanged model on `batches` (one pass for all of them) and
    keep their uint8 ranges in `ctx.activation_ranges` (the qat stage's fallback measures the same way)."""
    ctx.activation_ranges.update(activation_ranges(model, names, batches, ctx.int8_scheme))


@register_probe("int8", lambda _c: (8.0,), lambda _b: "int8", setup=calibrate_activations_)
@contextmanager
def int8_probe(model: nn.Module, name: str, _bits: float, ctx: ProbeContext) -> Iterator[tuple[nn.Module, Effect]]:
    if name not in ctx.activation_ranges:
        raise RuntimeError(f"int8 probe of {name}: its activation range was not calibrated")
    layer = model.get_submodule(name)
    with int8_alone(layer, ctx.activation_ranges[name], ctx.int8_scheme):
        yield model, Effect(bytes_saved=3 * layer.weight.numel())


# --- inq -------------------------------------------------------------------------------------------


@register_probe("inq", lambda c: tuple(float(b) for b in c.inq_bits), lambda b: f"inq {int(b)}b")
@contextmanager
def inq_probe(model: nn.Module, name: str, bits: float, ctx: ProbeContext) -> Iterator[tuple[nn.Module, Effect]]:
    layer = model.get_submodule(name)
    weight = layer.weight.detach()
    saved = weight.numel() * (32 - int(bits)) // 8
    with weight_replaced(layer, round_layer(weight, int(bits))):
        yield model, Effect(bytes_saved=saved)
