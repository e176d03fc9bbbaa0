"""The `qat` stage: INT8 quantization, post-training (`epochs: 0`) or quantization-aware, shipped as an int8 model.

Every int8 step goes through a quantization backend (`pipeline.core.int8`; `backend: pt2e`, torch.export and
torchao, by default): fake quantization is inserted (per-channel symmetric int8 weights, uint8 activations with one
scale and zero point per tensor, BatchNorm folded into its convolution as quantization-aware training computes it),
ranges are calibrated on training batches, the model trains through the shared loop (`StageContext.fit`, so pruned
zeros and INQ-frozen weights stay as they are), observers and BatchNorm statistics are frozen after configurable
epochs, and the deployable form is the backend's converted int8 model, which exports to ONNX Runtime and OpenVINO
as a QDQ graph.

The stage's output model stays the fake-quant model, so a later stage (distillation) keeps training it; the `int8`
artifact converts it when it is written, so conversion happens again after whatever stage comes last.

Calibration runs the forward training runs (BatchNorm on batch statistics, running statistics kept as they were):
calibrating in eval mode gave ranges orders of magnitude off what training sees where running statistics do not
describe the activations yet (efficientnet_b0, mobilenetv3_large_100, ghostnet_100), and training diverged. Only
`epochs: 0` (post-training quantization) calibrates in eval mode, as the int8 model runs.

**INQ + INT8.** Where the input is an INQ model, its layers' int8 scales keep their powers of two exact where int8
can hold them (`pipeline.core.int8.pow2`); `inq_int8_mismatches` checks the converted model against the INQ values,
and the stage reports `int8_inq_exact_layers`, `int8_inq_inexact_layers`, `int8_inq_inexact_weights`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_serializer, model_validator
from torch import nn

from pipeline.core.artifacts import register_artifact_format
from pipeline.core.int8 import (
    DEFAULT_BACKEND,
    Int8Plan,
    QuantizationBackend,
    available_backends,
    calibrate_,
    get_backend,
    is_fake_quantized,
)
from pipeline.core.int8.pow2 import pow2_octaves
from pipeline.core.models import ModelState
from pipeline.core.structure import StructuralChange, register_structural_change
from pipeline.core.training import TrainConfig
from stages.allocation import match_layers
from stages.base import StageContext, StageOutput, register_stage
from stages.qat_fallback import choose_fp32_layers, explicit_fp32_layers

log = logging.getLogger("pipeline")


class QATConfig(TrainConfig):
    """Calibration, freezing schedule and training of INT8 quantization-aware training."""

    backend: str = Field(
        DEFAULT_BACKEND,
        description="quantization backend (pipeline.core.int8): pt2e (torch.export + torchao, QDQ for ONNX Runtime "
        "and OpenVINO)",
    )

    # Fine-tuning a trained model: a few epochs, a small peak LR, cosine decay, no warm-up.
    epochs: int = Field(
        2, ge=0, le=10_000, description="QAT epochs (0: calibrate only, i.e. post-training quantization)"
    )
    lr: float = Field(0.005, gt=0, le=10, description="peak learning rate of the fake-quant fine-tuning")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("cosine", description="per-step LR schedule")
    calibration_batches: int = Field(
        8,
        ge=0,
        le=100_000,
        description="training batches (no augmentation) run with observers on before training, to start from "
        "the ranges training sees (BatchNorm on batch statistics, running statistics unchanged); with epochs: 0 "
        "they alone set the ranges, in eval mode",
    )
    freeze_observers_epoch: int = Field(
        1,
        ge=0,
        le=10_000,
        description="completed epochs after which activation and weight ranges (scales, zero points) stop "
        "updating (0: right after calibration; >= epochs: not during this stage)",
    )
    freeze_bn_epoch: int = Field(
        1,
        ge=0,
        le=10_000,
        description="completed epochs after which BatchNorm running mean/variance stop updating, so the "
        "folded conv weights see fixed statistics (0: from the start)",
    )

    fp32_layers: Literal["auto"] | tuple[str, ...] = Field(
        (),
        description="conv / linear layers kept in floating point (int8 fallback): names or globs, or 'auto' to keep "
        "the most sensitive per MAC until the predicted drop is at most max_drop",
    )
    max_drop: float | None = Field(
        None, ge=0, le=100, description="fp32_layers auto: the predicted validation top-1 drop (points) to fit in"
    )
    allocation_images: int = Field(
        1000, ge=100, le=1_000_000, description="fp32_layers auto: validation images each layer's int8 is scored on"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name not in available_backends():
            raise ValueError(f"unknown quantization backend {name!r}; available: {', '.join(available_backends())}")
        return name

    @model_validator(mode="after")
    def _fallback_budget(self) -> QATConfig:
        if self.fp32_layers == "auto" and self.max_drop is None:
            raise ValueError("fp32_layers: auto needs max_drop (the predicted top-1 drop to fit in, in points)")
        if self.fp32_layers != "auto" and self.max_drop is not None:
            raise ValueError("max_drop is only used with fp32_layers: auto")
        if isinstance(self.fp32_layers, tuple) and any(not p.strip() for p in self.fp32_layers):
            raise ValueError("fp32_layers: layer names must not be empty")
        return self

    def check_layer_names(self, layers: dict[str, int]) -> None:
        """Raise LayerNameError when an explicit fp32_layers pattern names no layer (`layers`: conv / linear layers by
        module name -> weight count), so a recipe is refused when it loads."""
        if isinstance(self.fp32_layers, tuple) and self.fp32_layers:
            match_layers(self.fp32_layers, list(layers), "fp32_layers")

    @model_serializer(mode="wrap")
    def _fallback_only_when_used(self, handler) -> dict[str, Any]:
        """The fallback fields are left out while every layer is int8, so recipes written before they existed keep
        their cache keys."""
        data = handler(self)
        if self.fp32_layers == ():
            for key in ("fp32_layers", "max_drop", "allocation_images"):
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _ranges_get_observed(self) -> QATConfig:
        if self.calibration_batches == 0 and self.epochs == 0:
            raise ValueError("epochs: 0 (post-training quantization) needs calibration_batches >= 1")
        if self.calibration_batches == 0 and self.freeze_observers_epoch == 0:
            raise ValueError(
                "freeze_observers_epoch: 0 freezes ranges before training; it needs calibration_batches >= 1"
            )
        return self


# --- when: calibration and the freezing schedule -------------------------------------------------


def frozen_at(config: QATConfig, completed_epochs: int) -> tuple[bool, bool]:
    """(observers frozen, BatchNorm statistics frozen) once `completed_epochs` epochs are done."""
    return completed_epochs >= config.freeze_observers_epoch, completed_epochs >= config.freeze_bn_epoch


def training_images(ctx: StageContext, batches: int):
    """The first `batches` training batches' images, without augmentation, in the stage's data order."""
    loader = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=False)
    return (images for images, _ in itertools.islice(loader, batches))


# --- the stage -----------------------------------------------------------------------------------


# After qat the model is a fake-quant graph: INQ's levels and low-rank factors need float weights, and a second qat
# would quantize twice. Stages that train it may follow, and prune, which works on the float weights under the
# fake quantization and quantizes again through the state's wrapper (`FakeQuantized`).
# version 3: through a quantization backend, PT2E by default (version 2: FX, the fp32 fallback)
@register_stage(
    "qat",
    config=QATConfig,
    may_follow={"distill", "train", "prune"},
    lowers={"bytes", "compute"},
    fake_quant=True,
    version=4,  # 4: the int8 scheme of 8-bit activations and 7-bit weights (was 7-bit activations)
)
def run_qat(state: ModelState | None, config: QATConfig, ctx: StageContext) -> StageOutput:
    """INT8 quantization-aware training (or post-training quantization), shipped as an int8 model."""
    if state is None:
        raise ValueError("qat needs a trained input model: put a `train` (or pruning, INQ) stage before it")
    if is_fake_quantized(state.model):
        raise ValueError("qat: the input model is already fake-quantized (an earlier qat stage); use one qat stage")
    backend = get_backend(config.backend)
    fp32_layers, fallback = _fp32_layers(state, config, ctx)
    prepared = fake_quantize_(state, ctx, backend, fp32_layers, config.calibration_batches)

    observers, bn_stats = frozen_at(config, 0)
    backend.freeze_(prepared, observers=False, bn_stats=bn_stats)  # calibrate in the mode the first epoch trains in
    batches = training_images(ctx, config.calibration_batches)
    calibrated = calibrate_(prepared, batches, ctx.device, training=config.epochs > 0)
    backend.freeze_(prepared, observers=observers, bn_stats=bn_stats)
    freezing = replace(ctx, on_epoch_end=_freezing_hook(backend, prepared, config, ctx.on_epoch_end))
    report = freezing.fit(state, config, desc="qat", step=1)  # step 1: another data order than calibration's

    float_model = state.wrapper.float_model(state)
    inq_weights = {n: float_model.get_submodule(n).weight.detach().cpu() for n in state.wrapper.plan.pow2_layers}
    metrics = int8_metrics(backend, prepared, inq_weights) | fallback
    metrics["qat_calibration_batches"] = float(calibrated)
    metrics["int8_fp32_layers"] = float(len(fp32_layers))
    return StageOutput(state, metrics=metrics, report=report)


def _fp32_layers(state: ModelState, config: QATConfig, ctx: StageContext) -> tuple[tuple[str, ...], dict[str, float]]:
    """The layers the int8 model keeps in floating point (`fp32_layers`: a list, or auto from sensitivity) and the
    allocation's metrics."""
    if config.fp32_layers == ():
        return (), {}
    if config.fp32_layers != "auto":
        layers = explicit_fp32_layers(state.model, config.fp32_layers)
        log.info("qat: %d layers stay in floating point: %s", len(layers), ", ".join(layers))
        return tuple(layers), {}
    assert config.max_drop is not None
    data = ctx.data.with_val_subset(config.allocation_images)
    batches = [images.to(ctx.device) for images in training_images(ctx, max(config.calibration_batches, 1))]
    scheme = get_backend(config.backend).scheme
    done = choose_fp32_layers(state.model, config.max_drop, data.eval_loader("val"), batches, ctx.data.input_size,
                              scheme, ctx.device)  # fmt: skip
    log.info(
        "qat: %d layers stay in floating point (%.1f%% of the MACs): %s; predicted drop %.2f points (int8 everywhere: "
        "%.2f), measured %.2f before training",
        len(done.layers), 100 * done.fp32_macs_share, ", ".join(done.layers) or "none", done.predicted_drop,
        done.int8_predicted_drop, done.measured_drop,
    )  # fmt: skip
    return tuple(done.layers), done.metrics()


# --- entering and leaving fake quantization (qat -> prune) ---------------------------------------


@dataclass
class FakeQuantized:
    """qat's `ModelWrapper`: the float model under the fake-quant graph (their parameters are the same tensors), the
    artifact format it had, and how it was quantized (backend, plan, calibration), so a later stage can work on the
    float weights and quantize them again the same way."""

    float_module: nn.Module
    float_format: str
    backend: str
    plan: Int8Plan
    calibration_batches: int = 8

    def float_model(self, state: ModelState) -> nn.Module:
        return self.float_module

    def unwrap_(self, state: ModelState) -> None:
        """The latent weights fake quantization trained, BatchNorm statistics included, as the float model."""
        names_prepared = {id(p): n for n, p in state.model.named_parameters()}
        device = next(state.model.parameters()).device
        state.rename_parameters_(_new_names(names_prepared, self.float_module, state.fixed.names()))
        state.model, state.wrapper = self.float_module.to(device), None
        state.structure.pop()  # int8_prepare
        state.artifact_format = self.float_format

    def rewrap_(self, state: ModelState, ctx: StageContext, *, training: bool) -> None:
        """Fake-quantize the (changed) float model with the same backend and fallback layers, and calibrate its
        ranges on `calibration_batches` training batches in the mode its fine-tuning runs in (`training`)."""
        backend = get_backend(self.backend)
        prepared = fake_quantize_(state, ctx, backend, self.plan.fp32_layers, self.calibration_batches)
        backend.freeze_(prepared, observers=False, bn_stats=False)
        calibrate_(prepared, training_images(ctx, max(self.calibration_batches, 1)), ctx.device, training=training)


def fake_quantize_(
    state: ModelState, ctx: StageContext, backend: QuantizationBackend, fp32_layers: tuple[str, ...], calibration: int
) -> nn.Module:
    """Replace `state.model` by its fake-quant form from `backend` (weights shared, not copied) and record how: the
    structure gets `int8_prepare`, fixed weights and power-of-two grids follow the parameters if the backend renamed
    them, and the state is wrapped (`FakeQuantized`) so a later stage can work on the float weights. `fp32_layers`
    stay floating point (the int8 fallback); INQ's layers (`state.pow2_grids`) keep their powers of two."""
    pow2_layers = tuple(dict.fromkeys(name.rpartition(".")[0] for name in state.pow2_grids))
    plan = Int8Plan(tuple(ctx.data.input_size), tuple(p for p in pow2_layers if p not in fp32_layers), fp32_layers)
    float_model, float_format = state.model, state.artifact_format
    names_before = {id(p): n for n, p in float_model.named_parameters()}
    prepared = backend.prepare(float_model, plan)
    state.rename_parameters_(_new_names(names_before, prepared, state.fixed.names()))
    state.wrapper = FakeQuantized(float_model, float_format, backend.name, plan, calibration)
    state.model = prepared.to(ctx.device)
    state.fixed.project_(prepared)
    state.structure.append(StructuralChange("int8_prepare", {"backend": backend.name, **plan.to_dict()}))
    state.artifact_format = "int8"
    return prepared


def _freezing_hook(
    backend: QuantizationBackend,
    model: nn.Module,
    config: QATConfig,
    outer: Callable[[int, dict[str, float]], None] | None,
):
    """An epoch-end hook that applies the freezing schedule, then reports to `outer` (the tracker)."""

    def on_epoch_end(epoch: int, stats: dict[str, float]) -> None:
        observers, bn_stats = frozen_at(config, epoch + 1)
        backend.freeze_(model, observers=observers, bn_stats=bn_stats)
        if outer is not None:
            outer(epoch, {**stats, "qat_observers_frozen": float(observers), "qat_bn_frozen": float(bn_stats)})

    return on_epoch_end


def _new_names(names_before: dict[int, str], renamed: nn.Module, fixed: list[str]) -> dict[str, str]:
    """Old parameter name -> its name in `renamed` (the tensors are the same); raises when a parameter an earlier stage
    fixed would be lost."""
    names = {names_before[id(p)]: n for n, p in renamed.named_parameters() if id(p) in names_before}
    lost = [n for n in fixed if n not in names]
    if lost:
        raise RuntimeError(f"qat: fake quantization lost parameters fixed by an earlier stage: {lost[:5]}")
    return names


# --- what the int8 model holds -------------------------------------------------------------------


def int8_metrics(
    backend: QuantizationBackend, prepared: nn.Module, inq_weights: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Converts the model: int8 layer count, ops left in floating point between int8 ones, and how exactly the INQ
    layers' values (`inq_weights`: layer -> its power-of-two weights) survived."""
    converted = backend.convert(prepared)
    int8 = backend.int8_weights(converted)
    islands = backend.float_ops(converted)
    if islands:
        log.info("qat: %d ops run in floating point between int8 ops: %s", len(islands), ", ".join(islands[:10]))
    metrics = {"int8_layers": float(len(int8)), "int8_fp32_ops": float(len(islands))}
    if inq_weights:
        mismatches = inq_int8_mismatches(int8, inq_weights)
        inexact = {n: c for n, c in mismatches.items() if c}
        metrics["int8_inq_exact_layers"] = float(len(mismatches) - len(inexact))
        metrics["int8_inq_inexact_layers"] = float(len(inexact))
        metrics["int8_inq_inexact_weights"] = float(sum(inexact.values()))
        if inexact:
            log.warning(
                "qat: %d of %d INQ layers are not exact in int8 (levels span more than %d octaves in a channel; "
                "+2^n1 clamps to %d/%d of its value): %s",
                len(inexact), len(mismatches), pow2_octaves(backend.scheme.weight_qmax), backend.scheme.weight_qmax,
                backend.scheme.weight_qmax + 1,
                ", ".join(f"{n} ({c} weights)" for n, c in list(inexact.items())[:8]),
            )  # fmt: skip
        else:
            log.info("qat: all %d INQ layers hold their power-of-two values exactly in int8", len(mismatches))
    return metrics


def inq_int8_mismatches(int8_weights: dict[str, torch.Tensor], inq_weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per INQ layer, how many int8 weights are not its INQ value times one per-channel factor.

    `int8_weights`: layer -> int8 weight of the converted model (`QuantizationBackend.int8_weights`); `inq_weights`:
    layer -> the INQ (power-of-two) float weights before BatchNorm folding. Exact means int8 = w·f_c for a single f_c
    per output channel (the folded BN scale over the step), so the int8 model computes what the INQ model computes.
    A layer that is not int8 counts fully.
    """
    out = {}
    for name, w in inq_weights.items():
        if name not in int8_weights:
            out[name] = w.numel()
            continue
        q = int8_weights[name].double().flatten(1)
        w = w.double().flatten(1)
        # The factor is read off the channel's largest, smallest or median non-zero weight, whichever explains more
        # (a channel whose two ends did not fit has its factor in the middle).
        largest = w.abs().argmax(1, keepdim=True)
        smallest = torch.where(w != 0, w.abs(), torch.inf).argmin(1, keepdim=True)
        median = torch.where(w != 0, w.abs(), torch.nan).nanmedian(1, keepdim=True).indices
        wrong = torch.stack([_mismatches_with_factor(q, w, anchor) for anchor in (largest, smallest, median)])
        out[name] = int(wrong.amin(0).sum())
    return out


def _mismatches_with_factor(q: torch.Tensor, w: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Per channel, entries where q != w·f with f = q/w at `anchor` (0 for an all-zero channel)."""
    w_at = w.gather(1, anchor)
    factor = torch.where(w_at != 0, q.gather(1, anchor) / torch.where(w_at != 0, w_at, 1.0), 0.0)
    return (q != w * factor).sum(1)


# --- the artifact --------------------------------------------------------------------------------

INT8_FORMAT = 2
"""Layout of the `int8` artifact's payload: 2, a quantization backend's own (named in it); 1 (no `int8_format` key,
until 2026-12) was FX graph mode's converted state_dict, which no backend reads any more."""


@register_structural_change("int8_prepare")
def _replay_int8_prepare(model: nn.Module, args: dict[str, Any]) -> nn.Module:
    """The fake-quant graph the named backend makes of the float model with the recorded plan."""
    return get_backend(args["backend"]).prepare(model, Int8Plan.from_dict(args))


@register_artifact_format("int8", version=2, standalone=lambda payload: _backend_of(payload).self_contained)
class Int8Quantized:
    """The quantization backend's converted int8 model (int8 weights with per-channel scales, activation scales and
    zero points), converted when it is written; read back by the same backend."""

    @staticmethod
    def encode(state: ModelState) -> dict[str, Any]:
        prepares = [change for change in state.structure if change.kind == "int8_prepare"]
        if not prepares:
            raise ValueError("int8 artifact: the model did not pass through qat (no fake-quant graph to convert)")
        backend = get_backend(prepares[-1].args["backend"])
        converted = backend.convert(state.model)
        payload = backend.encode(converted, Int8Plan.from_dict(prepares[-1].args))
        return {"int8_format": INT8_FORMAT, "backend": backend.name, **payload}

    @staticmethod
    def decode(payload: dict[str, Any], model: nn.Module | None) -> nn.Module:
        return _backend_of(payload).decode(payload, model)


def _backend_of(payload: dict[str, Any]) -> QuantizationBackend:
    version = payload.get("int8_format", 1)
    if version != INT8_FORMAT:
        raise ValueError(
            f"int8 artifact in format {version} (FX graph mode, retired in favour of PT2E); this version reads format "
            f"{INT8_FORMAT}: run the recipe that made it again (its stages up to qat are reused from the cache)"
        )
    return get_backend(payload["backend"])
