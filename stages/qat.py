"""The `qat` stage: INT8 quantization-aware training, shipped as a model that runs real int8 CPU kernels.

Fake quantization is inserted (per-channel symmetric int8 weights, uint8 activations with one
scale and zero point per tensor; `pipeline.core.int8_fx`), the model trains through the shared loop
(`StageContext.fit`, so pruned zeros and INQ-frozen weights stay as they are), observers and
BatchNorm statistics are frozen after configurable epochs, and the deployable form is the converted
model, whose convolutions and linear layers run on fbgemm's int8 kernels (PyTorch's `x86` engine).

The stage's output model stays the fake-quant (prepared) model, so a later stage (distillation)
keeps training it; the `int8` artifact converts a copy when it is written, so conversion happens
again after whatever stage comes last.

Calibration runs the forward training runs (BatchNorm on batch statistics, running statistics kept
as they were): calibrating in eval mode gave ranges orders of magnitude off what training sees where
running statistics do not describe the activations yet (efficientnet_b0, mobilenetv3_large_100,
ghostnet_100), and training diverged. Only `epochs: 0` (post-training quantization) calibrates in
eval mode, as the int8 model runs.

**INQ + INT8.** Where the input is an INQ model, its layers get `PowerOfTwoWeightObserver`: per
output channel the int8 scale is the channel's largest folded magnitude / 64, a power-of-two step
below it, so every power-of-two weight whose magnitude is within 6 octaves of the channel's largest
becomes an exact integer ±2^j (the BatchNorm scale multiplies a whole channel, so it does not change
which integers). INQ with b bits spans 2^(b-2) - 1 octaves: up to 4 bits every channel fits; at
5 bits a channel that uses both the largest and the smallest level is put on step max/128 instead,
and its +2^n1 weights clamp to 127/128 of their value. `inq_int8_mismatches` checks the converted
model against the INQ values; the stage reports `int8_inq_exact_layers`, `int8_inq_inexact_layers`,
`int8_inq_inexact_weights` and logs the inexact layers.

Measured choices (FX rather than PT2E, int8 vs fp32 speed per model) are in BENCHMARKS.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field, model_serializer, model_validator
from torch import nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
from torch.ao.quantization import FakeQuantizeBase
from torch.fx import GraphModule

from pipeline.core.artifacts import register_artifact_format
from pipeline.core.data import TensorLoader
from pipeline.core.int8_fx import (
    BACKEND,
    POW2_OCTAVES,
    PowerOfTwoWeightObserver,
    convert_int8,
    fp32_ops,
    load_portable_state_dict_,
    picklable_qconfigs_,
    plain_torch_layers_,
    portable_state_dict,
    prepare_qat,
)
from pipeline.core.metrics import int8_modules
from pipeline.core.models import ModelState
from pipeline.core.structure import StructuralChange, register_structural_change
from pipeline.core.training import TrainConfig
from stages.allocation import match_layers
from stages.base import StageContext, StageOutput, register_stage
from stages.qat_fallback import choose_fp32_layers, explicit_fp32_layers

log = logging.getLogger("pipeline")


class QATConfig(TrainConfig):
    """Calibration, freezing schedule and training of INT8 quantization-aware training."""

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


def freeze_(model: nn.Module, *, observers: bool, bn_stats: bool) -> None:
    """Stop range observers and/or BatchNorm statistics updating (power-of-two weight rules stay live)."""
    for module in model.modules():
        pow2 = isinstance(getattr(module, "activation_post_process", None), PowerOfTwoWeightObserver)
        if observers and isinstance(module, FakeQuantizeBase) and not pow2:
            module.disable_observer()
        if bn_stats and isinstance(module, _ConvBnNd):
            module.freeze_bn_stats()


@torch.no_grad()
def calibrate_(model: nn.Module, loader: TensorLoader, batches: int, device: torch.device, *, training: bool) -> int:
    """Run up to `batches` batches with observers on; returns how many ran.

    `training`: the forward QAT trains with (BatchNorm on batch statistics unless frozen), so the ranges fit
    what training sees; BatchNorm running statistics stay as they were. Otherwise eval mode, as the int8
    model runs.
    """
    model.train(training)
    statistics = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    kept = [b.clone() for b in statistics]
    ran = 0
    for images, _ in loader:
        if ran >= batches:
            break
        model(images.to(device))
        for buffer, value in zip(statistics, kept, strict=True):
            buffer.copy_(value)  # each batch folds and normalises as the first training step will
        ran += 1
    return ran


# --- the stage -----------------------------------------------------------------------------------


# After qat the model is a fake-quant graph: INQ's levels and low-rank factors need float weights, and a second qat
# would quantize twice. Stages that train it may follow, and prune, which works on the float weights under the
# fake quantization and quantizes again through the state's wrapper (`FakeQuantized`).
# version 2: int8_fp32_layers, the fp32 fallback
@register_stage(
    "qat",
    config=QATConfig,
    may_follow={"distill", "train", "prune"},
    lowers={"bytes", "compute"},
    fake_quant=True,
    version=2,
)
def run_qat(state: ModelState | None, config: QATConfig, ctx: StageContext) -> StageOutput:
    """INT8 quantization-aware training: fake-quant fine-tuning, shipped as a real int8 model (x86 kernels)."""
    if state is None:
        raise ValueError("qat needs a trained input model: put a `train` (or pruning, INQ) stage before it")
    _check_can_quantize(state.model)
    fp32_layers, fallback = _fp32_layers(state, config, ctx)
    prepared = fake_quantize_(state, ctx, fp32_layers)
    pow2_modules = [m for m in state.structure[-1].args["pow2_modules"] if m not in fp32_layers]

    observers, bn_stats = frozen_at(config, 0)
    freeze_(prepared, observers=False, bn_stats=bn_stats)  # calibrate in the mode the first epoch trains in
    calibration = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=False)
    training = config.epochs > 0
    calibrated = calibrate_(prepared, calibration, config.calibration_batches, ctx.device, training=training)
    freeze_(prepared, observers=observers, bn_stats=bn_stats)
    freezing = replace(ctx, on_epoch_end=_freezing_hook(prepared, config, ctx.on_epoch_end))
    report = freezing.fit(state, config, desc="qat", step=1)  # step 1: another data order than calibration's

    metrics = _int8_metrics(prepared, pow2_modules) | fallback
    metrics["qat_calibration_batches"] = float(calibrated)
    metrics["int8_fp32_layers"] = float(len(fp32_layers))
    return StageOutput(state, metrics=metrics, report=report)


def _fp32_layers(state: ModelState, config: QATConfig, ctx: StageContext) -> tuple[tuple[str, ...], dict[str, float]]:
    """The layers the int8 model keeps in floating point (`fp32_layers`: a list, or auto from sensitivity) and the
    allocation's metrics."""
    if config.fp32_layers == ():
        return (), {}
    model = plain_torch_layers_(state.model)  # the names the fake-quant graph gets (conv / linear names unchanged)
    if config.fp32_layers != "auto":
        layers = explicit_fp32_layers(model, config.fp32_layers)
        log.info("qat: %d layers stay in floating point: %s", len(layers), ", ".join(layers))
        return tuple(layers), {}
    assert config.max_drop is not None
    data = ctx.data.with_val_subset(config.allocation_images)
    loader = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=False)
    calibration = [images.to(ctx.device) for images, _ in itertools.islice(loader, max(config.calibration_batches, 1))]
    done = choose_fp32_layers(model, config.max_drop, data.eval_loader("val"), calibration, ctx.data.input_size,
                              ctx.device)  # fmt: skip
    log.info(
        "qat: %d layers stay in floating point (%.1f%% of the MACs): %s; predicted drop %.2f points (int8 everywhere: "
        "%.2f), measured %.2f before training",
        len(done.layers), 100 * done.fp32_macs_share, ", ".join(done.layers) or "none", done.predicted_drop,
        done.int8_predicted_drop, done.measured_drop,
    )  # fmt: skip
    return tuple(done.layers), done.metrics()


# --- leaving and re-entering fake quantization (qat -> prune) --------------------------------------------


@dataclass
class FakeQuantized:
    """qat's `ModelWrapper`: the float model under the fake-quant graph (their parameters are the same tensors) and
    the artifact format it had, so a later stage can work on the float weights and quantize them again."""

    float_module: nn.Module
    float_format: str
    fp32_layers: tuple[str, ...] = ()  # kept in floating point when quantized again

    def float_model(self, state: ModelState) -> nn.Module:
        return self.float_module

    def unwrap_(self, state: ModelState) -> None:
        """The latent weights fake quantization trained, BatchNorm statistics included, as the float model."""
        names_prepared = {id(p): n for n, p in state.model.named_parameters()}
        device = next(state.model.parameters()).device
        state.rename_parameters_(_new_names(names_prepared, self.float_module, state.fixed.names()))
        state.model, state.wrapper = self.float_module.to(device), None
        state.structure.pop()  # qat_prepare; fx_plain_layers stays: the float model keeps its plain torch layers
        state.artifact_format = self.float_format

    def rewrap_(self, state: ModelState, ctx: StageContext, *, training: bool) -> None:
        """Fake-quantize the (changed) float model with the same quantizers, and calibrate its ranges on training
        batches in the mode its fine-tuning runs in (`training`)."""
        prepared = fake_quantize_(state, ctx, self.fp32_layers)
        state.structure.pop(-2)  # fx_plain_layers is already in the record from the first quantization
        freeze_(prepared, observers=False, bn_stats=False)
        calibration = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=False)
        calibrate_(prepared, calibration, 8, ctx.device, training=training)


def fake_quantize_(state: ModelState, ctx: StageContext, fp32_layers: tuple[str, ...] = ()) -> GraphModule:
    """Replace `state.model` by its fake-quant form (weights shared, not copied) and record how: the structure gets
    `fx_plain_layers` and `qat_prepare`, fixed weights and power-of-two grids follow the new parameter names, and
    the state is wrapped (`FakeQuantized`) so a later stage can work on the float weights. `fp32_layers` stay float
    modules (the int8 fallback)."""
    pow2_modules = [name.rpartition(".")[0] for name in state.pow2_grids]
    float_model, float_format = plain_torch_layers_(state.model), state.artifact_format
    names_before = {id(p): n for n, p in float_model.named_parameters()}
    prepared = prepare_qat(float_model, ctx.data.input_size, pow2_modules, fp32_layers)
    picklable_qconfigs_(float_model)  # FX set qconfigs on it too; the stage cache pickles it with the state
    state.rename_parameters_(_new_names(names_before, prepared, state.fixed.names()))
    state.wrapper = FakeQuantized(float_model, float_format, fp32_layers)
    state.model = prepared.to(ctx.device)
    state.fixed.project_(prepared)
    state.structure.append(StructuralChange("fx_plain_layers"))
    args = {"backend": BACKEND, "pow2_modules": pow2_modules, "input_size": list(ctx.data.input_size)}
    if fp32_layers:  # only then, so artifacts written before the fallback existed replay as they were
        args["fp32_modules"] = list(fp32_layers)
    state.structure.append(StructuralChange("qat_prepare", args))
    state.artifact_format = "int8"
    return prepared


@register_structural_change("fx_plain_layers")
def _replay_plain_layers(model: nn.Module, _args: dict[str, Any]) -> nn.Module:
    """timm's BatchNormAct2d and Linear replaced by plain torch modules (module names change under the first)."""
    return plain_torch_layers_(model)


def _check_can_quantize(model: nn.Module) -> None:
    if any(isinstance(m, FakeQuantizeBase) for m in model.modules()):
        raise ValueError("qat: the input model is already fake-quantized (an earlier qat stage); use one qat stage")
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"qat: this torch build has no {BACKEND!r} quantized engine (int8 CPU kernels)")


def _freezing_hook(model: nn.Module, config: QATConfig, outer: Callable[[int, dict[str, float]], None] | None):
    """An epoch-end hook that applies the freezing schedule, then reports to `outer` (the tracker)."""

    def on_epoch_end(epoch: int, stats: dict[str, float]) -> None:
        observers, bn_stats = frozen_at(config, epoch + 1)
        freeze_(model, observers=observers, bn_stats=bn_stats)
        if outer is not None:
            outer(epoch, {**stats, "qat_observers_frozen": float(observers), "qat_bn_frozen": float(bn_stats)})

    return on_epoch_end


def _new_names(names_before: dict[int, str], renamed: nn.Module, fixed: list[str]) -> dict[str, str]:
    """Old parameter name -> its name in `renamed` (fusion moves BatchNorms, the tensors are the same); raises when a
    parameter an earlier stage fixed would be lost."""
    names = {names_before[id(p)]: n for n, p in renamed.named_parameters() if id(p) in names_before}
    lost = [n for n in fixed if n not in names]
    if lost:
        raise RuntimeError(f"qat: fake quantization lost parameters fixed by an earlier stage: {lost[:5]}")
    return names


def _int8_metrics(prepared: nn.Module, pow2_modules: list[str]) -> dict[str, float]:
    """Converts a copy: int8 layer count, fp32 islands, and how exactly INQ values survived."""
    converted = convert_int8(prepared)
    islands = fp32_ops(converted)
    if islands:
        log.info("qat: %d ops run in fp32 between int8 kernels: %s", len(islands), ", ".join(islands[:10]))
    metrics = {
        "int8_layers": float(len(int8_modules(converted))),
        "int8_fp32_ops": float(len(islands)),
        "qat_exact_bn_fold_layers": float(sum(
            1 for m in prepared.modules() if getattr(m, "_enable_slow_path_for_better_numerical_stability", False)
        )),
    }  # fmt: skip
    if pow2_modules:
        inq_weights = {n: prepared.get_submodule(n).weight.detach().cpu() for n in pow2_modules}
        mismatches = inq_int8_mismatches(converted, inq_weights)
        inexact = {n: c for n, c in mismatches.items() if c}
        metrics["int8_inq_exact_layers"] = float(len(mismatches) - len(inexact))
        metrics["int8_inq_inexact_layers"] = float(len(inexact))
        metrics["int8_inq_inexact_weights"] = float(sum(inexact.values()))
        if inexact:
            log.warning(
                "qat: %d of %d INQ layers are not exact in int8 (levels span more than %d octaves in a channel; "
                "+2^n1 clamps to 127/128 of its value): %s",
                len(inexact), len(mismatches), POW2_OCTAVES,
                ", ".join(f"{n} ({c} weights)" for n, c in list(inexact.items())[:8]),
            )  # fmt: skip
        else:
            log.info("qat: all %d INQ layers hold their power-of-two values exactly in int8", len(mismatches))
    return metrics


def inq_int8_mismatches(converted: nn.Module, inq_weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per INQ layer, how many int8 weights are not its INQ value times one per-channel factor.

    `inq_weights` maps module names to the INQ (power-of-two) float weights before BatchNorm folding.
    Exact means int8 = w·f_c for a single f_c per output channel (the folded BN scale over the step), so
    the int8 model computes what the INQ model computes. A layer that is not an int8 module counts fully.
    """
    modules, int8 = dict(converted.named_modules()), set(int8_modules(converted))
    out = {}
    for name, w in inq_weights.items():
        module = modules.get(name)
        if module is None or module not in int8:
            out[name] = w.numel()
            continue
        q = module.weight().int_repr().double().flatten(1)
        w = w.double().flatten(1)
        # The factor is read off the channel's largest or its smallest non-zero weight, whichever explains more.
        largest = w.abs().argmax(1, keepdim=True)
        smallest = torch.where(w != 0, w.abs(), torch.inf).argmin(1, keepdim=True)
        wrong = torch.stack([_mismatches_with_factor(q, w, anchor) for anchor in (largest, smallest)])
        out[name] = int(wrong.amin(0).sum())
    return out


def _mismatches_with_factor(q: torch.Tensor, w: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Per channel, entries where q != w·f with f = q/w at `anchor` (0 for an all-zero channel)."""
    w_at = w.gather(1, anchor)
    factor = torch.where(w_at != 0, q.gather(1, anchor) / torch.where(w_at != 0, w_at, 1.0), 0.0)
    return (q != w * factor).sum(1)


# --- the artifact --------------------------------------------------------------------------------
@register_structural_change("qat_prepare")
def _replay_qat_prepare(model: nn.Module, args: dict[str, Any]) -> GraphModule:
    """The fake-quant graph FX made of the float model, with the same power-of-two weight quantizers."""
    if args["backend"] != BACKEND:
        raise ValueError(f"int8 artifact: backend {args['backend']!r} is not supported (only {BACKEND!r})")
    return prepare_qat(
        model, tuple(args["input_size"]), list(args["pow2_modules"]), tuple(args.get("fp32_modules", ()))
    )


@register_artifact_format("int8")
class Int8Quantized:
    """The converted int8 model's state: int8 weights with per-channel scales, fp32 biases, activation
    scales and zero points. Conversion runs when it is written; reading converts the replayed fake-quant
    graph (structure only) and loads the values into it."""

    @staticmethod
    def encode(state: ModelState) -> dict[str, Any]:
        if not any(change.kind == "qat_prepare" for change in state.structure):
            raise ValueError("int8 artifact: the model did not pass through qat (no fake-quant graph to convert)")
        return {"state_dict": portable_state_dict(convert_int8(state.model))}

    @staticmethod
    def decode(payload: dict[str, Any], model: nn.Module) -> nn.Module:
        converted = convert_int8(model)  # the graph only: every value comes from the state_dict below
        load_portable_state_dict_(converted, payload["state_dict"])
        return converted
