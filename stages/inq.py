"""The `inq` stage: Incremental Network Quantization (Zhou et al., ICLR 2017, arXiv 1702.03044).

Every conv and linear weight becomes a member of P = {±2^n1, …, ±2^n2, 0}, a layer at a time,
in accumulated portions: the largest not-yet-quantized weights of each layer are rounded to P
and frozen, the rest are retrained to make up for it, until every weight is in P.

What / how / when are kept apart, as pure functions the stage stitches together:
  what  `partition_mask`    which weights are quantized at a step (largest magnitudes first)
  how   `fit_exponents`,    the layer's level set (paper Eq. 2-3, or a least-squares n1: see below)
        `quantize_pow2`     and the rounding rule (paper Eq. 4), in stages/pow2.py
  when  `inq_schedule`      the accumulated portions, and after which of them to retrain

Freezing is the project's shared fixed-weights mechanism (`ModelState.fixed`): the shared loop masks the
gradients of frozen weights and projects them back after every optimizer step.

The paper anchors a layer's top level at its largest weight (`n1_rule: max`, the default). At 2-3
bits that leaves most of a heavy-tailed layer below the lowest level: with resnet10t on CIFAR-10,
99.75 % of the weights round to zero at 2 bits. `n1_rule: mse` (not in the paper) fits n1 by least
squares instead and clips the few largest weights; nothing else changes (BENCHMARKS.md, INQ).

Weights an earlier stage fixed (pruning's zeros) stay as they are and are not counted: the
portions are fractions of the weights that were still free when INQ started, i.e. of the
layer's non-pruned weights, and the level set comes from those surviving weights.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_serializer, model_validator
from torch import nn

from pipeline.core.artifacts import register_artifact_format
from pipeline.core.models import ModelState, PowerOfTwoGrid
from pipeline.core.training import TrainConfig, TrainReport
from stages.base import StageContext, StageOutput, register_stage
from stages.inq_allocation import allocate_bits, packed_bytes, widths_from_map
from stages.pow2 import (  # noqa: F401  (the level set and rounding, also imported from here)
    N1_SEARCH,
    N1Rule,
    _magnitude_index,
    _magnitudes,
    fit_exponents,
    inq_exponents,
    quantize_pow2,
    round_layer,
)

log = logging.getLogger("pipeline")

QUANTIZED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Module types whose `weight` INQ quantizes; norms, biases and everything else stay floating point."""

PartitionMode = Literal["magnitude", "random"]


class INQConfig(TrainConfig):
    """INQ's bit-width, portion schedule and partition rule, plus the retraining run after each portion."""

    # Defaults for fine-tuning an already trained model: a small peak LR, no warm-up.
    epochs: int = Field(
        1, ge=0, le=10_000, description="retraining epochs after each portion step but the last (0: no retraining)"
    )
    lr: float = Field(0.01, gt=0, le=10, description="peak learning rate of each retraining step (restarts per step)")
    schedule: Literal["onecycle", "cosine", "constant"] = Field(
        "cosine", description="per-step LR schedule, restarted at every portion step"
    )
    bits: int | Literal["auto"] | dict[str, int] = Field(
        5,
        description="bits per quantized weight: one flags zero, b-1 index 2^(b-1) signed powers of two (2..8 bits); "
        "a map {layer name or glob: bits} sets them per layer (the first matching pattern wins); 'auto' chooses "
        "each layer's width from measured sensitivity to meet target_bytes or target_bits",
    )
    target_bytes: int | None = Field(
        None, gt=0, description="bits auto: the packed size of the quantized weights to meet (bytes, at most)"
    )
    target_bits: float | None = Field(
        None, ge=2, le=8, description="bits auto: the mean bits per quantized weight to meet (at most), e.g. 3"
    )
    auto_bits: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), description="bits auto: the widths each layer may get")
    allocation_images: int = Field(
        1000, ge=100, le=1_000_000, description="bits auto: validation images each width of each layer is scored on"
    )
    accumulated_portions: tuple[float, ...] = Field(
        (0.5, 0.75, 0.875, 1.0),
        description="fraction (0..1] of each layer's non-pruned weights quantized after each step; "
        "strictly increasing, ending at 1.0",
    )
    partition: PartitionMode = Field(
        "magnitude", description="which free weights are quantized first: largest magnitudes (paper) or random"
    )
    n1_rule: N1Rule = Field(
        "max",
        description="how each layer's top exponent n1 is chosen: 'max' follows the paper (n1 = floor(log2(4s/3)) "
        "from the largest weight s, nothing clipped); 'mse' (not in the paper) takes the n1 among that one and the "
        f"{N1_SEARCH - 1} below it whose level set rounds the layer's surviving weights with the least squared "
        "error, clipping the few largest to ±2^n1; it keeps far fewer weights at zero at 2-4 bits",
    )
    final_epochs: int = Field(
        0,
        ge=0,
        le=10_000,
        description="epochs after the last portion step that train only what stays floating point (norms, "
        "biases) with every quantized weight fixed; 0 follows the paper (nothing trains after the last step)",
    )

    def total_epochs(self) -> int:
        return self.epochs * _retraining_steps(self.accumulated_portions) + self.final_epochs

    def with_total_epochs(self, epochs: int) -> INQConfig:
        steps, retraining = _retraining_steps(self.accumulated_portions), epochs - self.final_epochs
        per_step = max(1, round(retraining / steps)) if steps and retraining > 0 else 0
        return type(self).model_validate({**self.model_dump(), "epochs": per_step})

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, bits: int | str | dict[str, int]) -> int | str | dict[str, int]:
        widths = bits.values() if isinstance(bits, dict) else [bits] if isinstance(bits, int) else []
        if isinstance(bits, dict) and not bits:
            raise ValueError("a per-layer map needs at least one {layer name or glob: bits} entry")
        if any(not 2 <= b <= 8 for b in widths):
            raise ValueError(f"must be 2..8, got {bits}")
        return bits

    @field_validator("auto_bits")
    @classmethod
    def _auto_bits_in_range(cls, widths: tuple[int, ...]) -> tuple[int, ...]:
        if not widths or any(not 2 <= b <= 8 for b in widths) or len(set(widths)) != len(widths):
            raise ValueError(f"must be distinct widths in 2..8, got {list(widths)}")
        return tuple(sorted(widths))

    @model_validator(mode="after")
    def _target_with_auto(self) -> INQConfig:
        targets = [k for k in ("target_bytes", "target_bits") if getattr(self, k) is not None]
        if self.bits == "auto" and len(targets) != 1:
            raise ValueError("bits: auto needs exactly one of target_bytes or target_bits")
        if self.bits != "auto" and targets:
            raise ValueError(f"{targets[0]} is only used with bits: auto")
        return self

    def check_layer_names(self, layers: dict[str, int]) -> None:
        """Raise LayerNameError when a per-layer bits map names no layer or leaves one out (`layers`: conv / linear
        layers by module name -> weight count), so a recipe is refused when it loads."""
        if isinstance(self.bits, dict):
            widths_from_map(self.bits, layers, "bits")

    @model_serializer(mode="wrap")
    def _allocation_only_when_used(self, handler) -> dict[str, Any]:
        """The allocation fields are left out while bits is one width or a map, so recipes written before they
        existed keep their cache keys."""
        data = handler(self)
        if self.bits != "auto":
            for key in ("target_bytes", "target_bits", "auto_bits", "allocation_images"):
                data.pop(key, None)
        return data

    @field_validator("accumulated_portions")
    @classmethod
    def _portions_accumulate_to_one(cls, portions: tuple[float, ...]) -> tuple[float, ...]:
        allowed = "strictly increasing fractions in (0, 1] ending at 1.0, e.g. [0.5, 0.75, 0.875, 1.0]"
        if not portions:
            raise ValueError(f"must be {allowed}, got []")
        if any(not 0 < p <= 1 for p in portions):
            raise ValueError(f"each portion must be in (0, 1]; must be {allowed}, got {list(portions)}")
        if any(b <= a for a, b in zip(portions, portions[1:], strict=False)):
            raise ValueError(f"portions must be strictly increasing; must be {allowed}, got {list(portions)}")
        if portions[-1] != 1.0:
            raise ValueError(f"the last portion must be 1.0 (every weight quantized); must be {allowed}")
        return portions


# --- what: the partition -------------------------------------------------------------------------


def partition_mask(
    weights: torch.Tensor,
    already_fixed: torch.Tensor,
    portion: float,
    mode: PartitionMode = "magnitude",
    generator: torch.Generator | None = None,
    *,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """The entries to quantize now, so that `portion` (0..1] of the eligible entries are fixed.

    The target count is portion × eligible count, rounded half up; entries fixed before count towards it.

    `eligible` marks the entries the portion counts over (default: all; INQ passes the entries
    that were free when it started). Only eligible, not-yet-fixed entries are chosen: the largest
    |weights| first (`magnitude`, the paper's rule) or uniformly at random (`random`, with
    `generator` on the CPU). Returns a bool mask of the new entries only.
    """
    if not 0 < portion <= 1:
        raise ValueError(f"portion must be in (0, 1], got {portion}")
    eligible = torch.ones_like(already_fixed, dtype=torch.bool) if eligible is None else eligible.bool()
    candidates = eligible & ~already_fixed.bool()
    total = int(eligible.sum())
    take = min(math.floor(portion * total + 0.5), total) - int((eligible & already_fixed.bool()).sum())
    mask = torch.zeros(weights.numel(), dtype=torch.bool)
    if take <= 0:
        return mask.view(weights.shape)
    if mode == "magnitude":
        score = weights.detach().abs().float().cpu()
    elif mode == "random":
        score = torch.rand(weights.shape, generator=generator)
    else:
        raise ValueError(f"partition mode must be 'magnitude' or 'random', got {mode!r}")
    score = torch.where(candidates.cpu(), score, -math.inf).flatten()
    mask[torch.topk(score, take, sorted=False).indices] = True
    return mask.view(weights.shape)


# --- when: the schedule --------------------------------------------------------------------------


def inq_schedule(accumulated_portions: Sequence[float]) -> list[tuple[float, bool]]:
    """(portion quantized after the step, whether to retrain after it) for each step.

    No retraining after the last step: every weight is frozen then, so there is nothing to train.
    """
    return [(float(p), p < 1.0) for p in accumulated_portions]


def _retraining_steps(accumulated_portions: Sequence[float]) -> int:
    return sum(retrain for _, retrain in inq_schedule(accumulated_portions))


# --- the stage -----------------------------------------------------------------------------------


def inq_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights INQ quantizes, by parameter name: `weight` of every Conv1d/2d/3d and Linear module."""
    params = dict(model.named_parameters())
    out = {}
    for module_name, module in model.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if isinstance(module, QUANTIZED_MODULES) and name in params:
            out[name] = params[name]
    return out


@dataclass
class _Layer:
    """A layer's exponents, kept for the whole stage, and the entries its portions count over."""

    n1: int
    n2: int
    eligible: torch.Tensor  # bool, CPU: free when INQ started (not fixed by an earlier stage)
    bits: int


def _start_layers(state: ModelState, bits: int | dict[str, int], rule: N1Rule = "max") -> dict[str, _Layer]:
    """Fix each layer's level set from its surviving weights at its width (`bits`: one, or per parameter name); check
    what earlier stages fixed fits it."""
    layers = {}
    for name, param in inq_parameters(state.model).items():
        width = bits[name] if isinstance(bits, dict) else bits
        w = param.detach().cpu()
        pre = state.fixed.mask(name) if name in state.fixed else torch.zeros_like(w, dtype=torch.bool)
        values = state.fixed.values(name) if name in state.fixed else torch.zeros_like(w)
        surviving = torch.where(pre, values, w)[~(pre & (values == 0))]
        nonzero = surviving[surviving != 0]
        # A layer with no non-zero survivor has no level set; any n1 encodes its all-zero weights.
        n1, n2 = fit_exponents(nonzero, width, rule) if nonzero.numel() else (0, 1 - 2 ** (width - 1) // 2)
        off_grid = int((pre & (quantize_pow2(values, n1, n2) != values)).sum())
        if off_grid:
            raise ValueError(
                f"inq: {name} has {off_grid} weights fixed by an earlier stage at values outside "
                f"{{0, ±2^{n2}..±2^{n1}}}; INQ can keep only pre-fixed zeros or values on its grid"
            )
        layers[name] = _Layer(n1, n2, ~pre, width)
    return layers


@torch.no_grad()
def _quantize_portion_(
    state: ModelState, layers: dict[str, _Layer], portion: float, mode: PartitionMode, generator: torch.Generator
) -> None:
    """Round and freeze the next group of every layer so that `portion` of its eligible weights are fixed."""
    params = inq_parameters(state.model)
    for name, layer in layers.items():
        w = params[name].detach().cpu()
        fixed = state.fixed.mask(name) if name in state.fixed else torch.zeros_like(w, dtype=torch.bool)
        new = partition_mask(w, fixed, portion, mode, generator, eligible=layer.eligible)
        values = torch.zeros_like(w)
        values[new] = quantize_pow2(w[new], layer.n1, layer.n2)  # only the new group: fix_ keeps the older ones
        state.fixed.fix_(name, new, values)
    state.fixed.project_(state.model)


def _inq_metrics(state: ModelState, layers: dict[str, _Layer], steps: int) -> dict[str, float]:
    """Bits (the mean per quantized weight when widths differ) and the packed bytes of the quantized weights; share of
    the eligible weights quantized (1.0 when done); share of all quantized-layer weights at 0."""
    params = inq_parameters(state.model)
    eligible = sum(int(layer.eligible.sum()) for layer in layers.values())
    quantized = sum(int((state.fixed.mask(n) & layer.eligible).sum()) for n, layer in layers.items())
    entries = sum(params[n].numel() for n in layers)
    zeros = sum(int((params[n] == 0).sum()) for n in layers)
    bits = sum(params[n].numel() * layer.bits for n, layer in layers.items()) / entries if entries else 0.0
    return {
        "inq_bits": bits,
        "inq_weight_bytes": float(sum(packed_bytes(params[n].numel(), layer.bits) for n, layer in layers.items())),
        "inq_layers": float(len(layers)),
        "inq_steps": float(steps),
        "inq_quantized_fraction": quantized / eligible if eligible else 1.0,
        "inq_zero_fraction": zeros / entries if entries else 0.0,
    }


# version 2: inq_weight_bytes, per-layer widths
@register_stage("inq", config=INQConfig, lowers={"bytes"}, version=2, variant=lambda config: f"{config.bits}-bit")
def run_inq(state: ModelState | None, config: INQConfig, ctx: StageContext) -> StageOutput:
    """Incremental Network Quantization: conv/linear weights become ±2^k or 0 by portions, retraining the rest."""
    if state is None:
        raise ValueError("inq needs a trained input model: put a `train` (or pruning) stage before it in `stages:`")
    state.fixed.project_(state.model)
    widths, allocation = _widths(state, config, ctx)
    layers = _start_layers(state, widths, config.n1_rule)
    generator = torch.Generator().manual_seed(ctx.seed)
    schedule = inq_schedule(config.accumulated_portions)
    report = TrainReport()
    for step, (portion, retrain) in enumerate(schedule):
        _quantize_portion_(state, layers, portion, config.partition, generator)
        if retrain:  # a fresh optimizer and LR schedule per portion step, as in the paper
            report.extend(ctx.fit(state, config, desc=f"inq {portion:.1%}", step=step, epoch_offset=report.epochs,
                                  extra_stats={"inq_portion": portion}))  # fmt: skip
    if config.final_epochs:  # every conv/linear weight is fixed now: only norms and biases move
        final = config.model_copy(update={"epochs": config.final_epochs})
        report.extend(ctx.fit(state, final, desc="inq final (norms, biases)", step=len(schedule),
                              epoch_offset=report.epochs, extra_stats={"inq_portion": 1.0}))  # fmt: skip
    state.artifact_format = "inq"
    state.pow2_grids = {name: PowerOfTwoGrid(layer.n1, layer.bits) for name, layer in layers.items()}
    metrics = _inq_metrics(state, layers, len(schedule)) | allocation
    return StageOutput(state, metrics=metrics, report=report)


def _widths(state: ModelState, config: INQConfig, ctx: StageContext) -> tuple[int | dict[str, int], dict[str, float]]:
    """Each layer's width (one for all, or by parameter name) and the allocation's metrics (bits: auto)."""
    if isinstance(config.bits, int):
        return config.bits, {}
    modules = {name.rpartition(".")[0]: param.numel() for name, param in inq_parameters(state.model).items()}
    if isinstance(config.bits, dict):
        by_module = widths_from_map(config.bits, modules, "bits")
        return {f"{m}.weight": b for m, b in by_module.items()}, {}
    target = config.target_bytes
    if target is None:  # target_bits: the packed size of every layer at that mean width
        target = sum(packed_bytes(count, config.target_bits) for count in modules.values())
    data = ctx.data.with_val_subset(config.allocation_images)
    model = state.model
    done = allocate_bits(
        model, {m: model.get_submodule(m) for m in modules}, target, config.auto_bits,
        lambda w, bits: round_layer(w, bits, config.n1_rule), data.eval_loader("val"),
    )  # fmt: skip
    log.info("inq: allocated widths %s; %s bytes of packed weights (target %s); predicted drop %.2f points, measured "
             "%.2f before retraining", _widths_summary(done.bits), f"{done.weight_bytes:,}", f"{target:,}",
             done.predicted_drop, done.measured_drop)  # fmt: skip
    return {f"{m}.weight": b for m, b in done.bits.items()}, done.metrics()


def _widths_summary(bits: dict[str, int]) -> str:
    counts = Counter(bits.values())
    return ", ".join(f"{count} layers at {width} bits" for width, count in sorted(counts.items()))


# --- the artifact --------------------------------------------------------------------------------


def pow2_codes(w: torch.Tensor, n1: int, bits: int) -> torch.Tensor:
    """Each weight's b-bit code (uint8): 0 for zero, else 1<<(b-1) | sign<<(b-2) | (k - n2) for ±2^k.

    Raises if a weight is not in the layer's level set (changed after INQ, or another n1/bits).
    """
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    index = _magnitude_index(w, n1, n2)
    codes = torch.where(index > 0, (1 << (bits - 1)) | ((w < 0).long() << (bits - 2)) | (index - 1), 0)
    if not torch.equal(decode_pow2(codes.to(torch.uint8), n1, bits).to(w.dtype), w.detach()):
        raise ValueError(f"weights are not all in {{0, ±2^{n2}..±2^{n1}}}; cannot encode them in {bits} bits")
    return codes.to(torch.uint8)


def decode_pow2(codes: torch.Tensor, n1: int, bits: int) -> torch.Tensor:
    """fp32 weights from `pow2_codes` codes: exactly ±2^k or +0.0."""
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    codes = codes.long()
    nonzero = ((codes >> (bits - 1)) & 1) == 1
    negative = ((codes >> (bits - 2)) & 1) == 1
    index = torch.where(nonzero, (codes & ((1 << (bits - 2)) - 1)) + 1, 0)
    mag = _magnitudes(n1, n2, codes.device)[index]
    return torch.where(nonzero, torch.where(negative, -mag, mag), 0.0).float()


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (each < 2^bits) into a flat uint8 tensor, `bits` bits each, little-endian bit order."""
    flat = codes.detach().cpu().to(torch.uint8).flatten().numpy()
    planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `pack_bits` output, as uint8."""
    planes = np.unpackbits(packed.cpu().numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy(np.packbits(planes, axis=1, bitorder="little")[:, 0])


@register_artifact_format("inq")
class INQPacked:
    """INQ weights as bit-packed b-bit codes with their shape, n1 and bits; everything else fp32 as is."""

    @staticmethod
    def encode(state: ModelState) -> dict[str, Any]:
        layers = state.pow2_grids
        quantized, dense = {}, {}
        for key, value in state.model.state_dict().items():
            if key not in layers:
                dense[key] = value.detach().cpu().contiguous()
                continue
            n1, bits = layers[key].n1, layers[key].bits
            try:
                codes = pow2_codes(value.detach().cpu(), n1, bits)
            except ValueError as err:
                raise ValueError(f"inq artifact: {key}: {err}") from None
            quantized[key] = {"codes": pack_bits(codes, bits), "shape": list(value.shape), "n1": n1, "bits": bits}
        return {"state_dict": dense, "inq": quantized}

    @staticmethod
    def decode(payload: dict[str, Any], model: nn.Module) -> nn.Module:
        state_dict = dict(payload["state_dict"])
        for key, q in payload["inq"].items():
            count = math.prod(q["shape"])
            codes = unpack_bits(q["codes"], q["bits"], count)
            state_dict[key] = decode_pow2(codes, q["n1"], q["bits"]).view(q["shape"])
        model.load_state_dict(state_dict, strict=True)
        return model
