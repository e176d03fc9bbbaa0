"""The `qat` stage: INT8 quantization-aware training, shipped as a model that runs real int8 CPU kernels.

Fake quantization is inserted (per-channel symmetric int8 weights, uint8 activations with one
scale and zero point per tensor), the model trains through the shared loop (`StageContext.fit`, so
pruned zeros and INQ-frozen weights stay as they are), observers and BatchNorm statistics are frozen
after configurable epochs, and the deployable form is the converted model, whose convolutions and
linear layers run on fbgemm's int8 kernels (PyTorch's `x86` quantized engine).

The stage's output model stays the fake-quant (prepared) model, so a later stage (distillation)
keeps training it; the `int8` artifact converts a copy when it is written, so conversion happens
again after whatever stage comes last.

**Flow: FX graph mode (`torch.ao.quantization.quantize_fx`, `prepare_qat_fx` / `convert_fx`, x86
backend).** Measured on the 2-core AVX2 development machine (no VNNI), torch 2.14.1, timm models
with random weights, 32x32 input, 1 thread, median batch-1 time, while another benchmark shared
the CPU (so ratios, not absolute times, are the point):

  resnet18  fp32 eager 6.8 ms | FX int8 2.0 ms (3.4x; batch 64: 3.5x) | torchao 0.18 PT2E +
            X86InductorQuantizer: 75 ms eager (reference quantize/dequantize around fp32 ops),
            11.3 ms after torch.compile (34 s of compiling), fp32 compiled 8.1 ms
  resnet10t fp32 3.4 ms | FX int8 1.35 ms (2.6x; batch 64: 3.7x)
  mobilenetv3_small_100 fp32 3.9 ms | FX int8 5.0 ms (0.8x: slower at batch 1, where fbgemm's int8
            depthwise convolutions and per-op overheads dominate; batch 64: 4.3x faster)

FX gives real int8 kernels in eager mode: an artifact loads in a fresh process in about a second and
runs at once, with no compiler and no compile cache in the latency numbers; PT2E on this CPU is
slower than fp32 even after compiling. FX is deprecated upstream (it warns) but present and working
in the pinned torch; everything flow-specific sits behind `prepare_qat` and `convert_int8`, so the
flow can change without touching the stage, the config or the artifact's consumers.

**Pitfalls met and fixed (not worked around):**

* "`zero_point` must be between `quant_min` and `quant_max`" (FX QAT on timm resnet18): timm
  initialises the last BatchNorm of every residual block with weight 0 (`zero_init_last`). QAT's
  default conv-BN folding divides the convolution by gamma/std, so a zero gamma gives 0/0 = NaN,
  which poisons the running statistics; the next step's folded weights are NaN and the observer's
  zero point is out of range. Conv-BN modules with a zero gamma use torch's exact folding path
  (two convolutions per step, handles gamma = 0; `qat_exact_bn_fold_layers`).
* The same error, or "loss became nan" (efficientnet_b0, mobilenetv3_large_100, ghostnet_100, from
  random weights or a short baseline): calibration ran in eval mode (BatchNorm on running statistics)
  while QAT trains on batch statistics. Where running statistics do not describe the activations yet,
  eval-mode activations shrink to 1e-2 or grow to 1e9 through these nets' blocks, so the ranges were
  orders of magnitude off what training sees (the moving-average observers move 1 % a step): activations
  clipped or rounded to a constant, the next BatchNorm multiplied the backward pass by up to
  1/sqrt(eps) = 316 a layer, and one step took weights and gammas past 1e20, overflowing the folded
  weights and the weight observer's zero point. Calibration runs the forward training runs, running
  statistics kept as they were; only `epochs: 0` (PTQ) calibrates in eval mode, as the int8 model runs.
* timm's `BatchNormAct2d` (MobileNetV3, EfficientNet) is a BatchNorm2d subclass, so FX neither fuses
  it into the convolution nor keeps it a module: it is traced into `F.batch_norm` with the *training
  flag baked in*; traced in training mode, the int8 model would normalise with batch statistics. It
  is split into a plain BatchNorm2d and its activation before tracing (same tensors). timm's `Linear`
  is swapped for nn.Linear the same way, so the classifier is a quantized module, not a functional
  op. Tracing itself runs in eval mode, so functional dropout / drop path (`drop_rate`,
  `drop_path_rate`) keep their inference behaviour in the int8 model (and are off during QAT).
* MobileNetV3's last blocks have 1x1 spatial maps: BatchNorm in training mode needs batch > 1; the
  shared loop and calibration read the training loader, which drops the last partial batch.
* A model FX cannot quantize fails with a RuntimeError naming the layer or op: tracing errors, or any
  convolution or linear layer left in fp32 after conversion. There is no silent fp32 fallback; ops
  without an int8 kernel between int8 layers (e.g. SiLU, Flatten) are counted (`int8_fp32_ops`) and
  logged.

**INQ + INT8.** Where the input is an INQ model, its layers get `PowerOfTwoWeightObserver`: per
output channel the int8 scale is the channel's largest folded magnitude / 64, a power-of-two step
below it, so every power-of-two weight whose magnitude is within 6 octaves of the channel's largest
becomes an exact integer ±2^j (the BatchNorm scale multiplies a whole channel, so it does not change
which integers). INQ with b bits spans 2^(b-2) - 1 octaves: up to 4 bits every channel fits; at
5 bits (7 octaves: 1..128 needed, int8 holds up to 127) a channel that uses both the largest and the
smallest level is put on step max/128 instead, and its +2^n1 weights clamp to 127/128 of their value
(-2^n1 is exactly -128). `inq_int8_mismatches` checks the converted model against the INQ values;
the stage reports `int8_inq_exact_layers`, `int8_inq_inexact_layers`, `int8_inq_inexact_weights`
and logs the inexact layers.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import timm.layers
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    QConfig,
    QConfigMapping,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization.observer import PerChannelMinMaxObserver, _PartialWrapper
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from torch.fx import GraphModule

from pipeline.artifacts import register_artifact_format
from pipeline.constraints import FixedWeights
from pipeline.data import TensorLoader
from pipeline.evaluator import int8_modules
from pipeline.models import ModelState
from pipeline.structure import StructuralChange, register_structural_change
from pipeline.training import TrainConfig
from stages.base import StageContext, StageOutput, register_stage

log = logging.getLogger("pipeline")

BACKEND = "x86"
"""PyTorch's quantized engine whose qconfig and kernels (fbgemm) the int8 model uses."""

POW2_OCTAVES = 6
"""Octaves below a channel's largest magnitude that int8 holds exactly on a power-of-two step (2^6 = 64 <= 127)."""


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

    @model_validator(mode="after")
    def _ranges_get_observed(self) -> QATConfig:
        if self.calibration_batches == 0 and self.epochs == 0:
            raise ValueError("epochs: 0 (post-training quantization) needs calibration_batches >= 1")
        if self.calibration_batches == 0 and self.freeze_observers_epoch == 0:
            raise ValueError(
                "freeze_observers_epoch: 0 freezes ranges before training; it needs calibration_batches >= 1"
            )
        return self


# --- what: which quantizer each layer gets -------------------------------------------------------


class PowerOfTwoWeightObserver(PerChannelMinMaxObserver):
    """Per output channel, scale = max|w_c| / 2^6: power-of-two weights within 6 octaves become exact ints.

    A channel whose non-zero magnitudes span more than 6 octaves gets max|w_c| / 2^7 (its positive
    maximum clamps to 127). A rule of the current weights, not a running statistic: it is never
    frozen, so it follows the BatchNorm scale folded into the weights.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("min_nonzero_abs", torch.tensor([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        w = x.detach().to(self.min_val.dtype).transpose(0, self.ch_axis).flatten(1)
        self.min_val, self.max_val = w.amin(1), w.amax(1)
        self.min_nonzero_abs = torch.where(w != 0, w.abs(), torch.inf).amin(1)
        return x

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pow2_weight_qparams(torch.maximum(-self.min_val, self.max_val), self.min_nonzero_abs)


def pow2_weight_qparams(amax: torch.Tensor, min_nonzero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per channel from its largest and smallest non-zero magnitude (see the observer)."""
    fits = min_nonzero * 2.0**POW2_OCTAVES >= amax
    scale = torch.where(fits, amax / 2.0**POW2_OCTAVES, amax / 2.0 ** (POW2_OCTAVES + 1))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))  # an all-zero channel: any scale is exact
    return scale, torch.zeros_like(scale, dtype=torch.int64)


POW2_WEIGHT_FAKE_QUANT = FakeQuantize.with_args(
    observer=PowerOfTwoWeightObserver,
    quant_min=-128,
    quant_max=127,
    dtype=torch.qint8,
    qscheme=torch.per_channel_symmetric,
    ch_axis=0,
)


def qconfig_mapping(pow2_modules: list[str]) -> QConfigMapping:
    """PyTorch's x86 QAT defaults (per-channel symmetric int8 weights, per-tensor uint8 activations with the
    7-bit range fbgemm needs without VNNI); INQ layers (`pow2_modules`) keep their powers of two."""
    mapping = get_default_qat_qconfig_mapping(BACKEND)
    default = mapping.global_qconfig
    for name in pow2_modules:
        mapping.set_module_name(name, QConfig(activation=default.activation, weight=POW2_WEIGHT_FAKE_QUANT))
    return mapping


# --- how: prepare (insert fake quantization) and convert (int8 kernels) --------------------------


@contextmanager
def _quiet_fx():
    """FX quantization warns about its own deprecation and reduce_range on every call; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        yield


def plain_torch_layers_(model: nn.Module) -> nn.Module:
    """Replace timm subclasses FX would trace into functional ops by the plain torch modules (same tensors)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, timm.layers.BatchNormAct2d):
                setattr(parent, name, _split_bn_act(child))
            elif type(child) is timm.layers.Linear:
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight, linear.bias = child.weight, child.bias
                setattr(parent, name, linear.train(child.training))
    return model


def _split_bn_act(bn_act: timm.layers.BatchNormAct2d) -> nn.Sequential:
    bn = nn.BatchNorm2d(bn_act.num_features, bn_act.eps, bn_act.momentum, bn_act.affine, bn_act.track_running_stats)
    bn.weight, bn.bias = bn_act.weight, bn_act.bias
    bn.running_mean, bn.running_var = bn_act.running_mean, bn_act.running_var
    bn.num_batches_tracked = bn_act.num_batches_tracked
    parts = [("bn", bn)]
    parts += [] if isinstance(bn_act.drop, nn.Identity) else [("drop", bn_act.drop)]
    parts += [] if isinstance(bn_act.act, nn.Identity) else [("act", bn_act.act)]
    return nn.Sequential(OrderedDict(parts)).train(bn_act.training)


_TRAINING_BAKED = {
    nn.functional.batch_norm: "batch_norm",
    nn.functional.instance_norm: "instance_norm",
    nn.functional.dropout: "dropout",
    nn.functional.dropout1d: "dropout1d",
    nn.functional.dropout2d: "dropout2d",
    nn.functional.dropout3d: "dropout3d",
    nn.functional.alpha_dropout: "alpha_dropout",
    torch.bernoulli: "bernoulli (drop path)",
    "bernoulli_": "bernoulli_ (drop path)",
}
"""Functional ops whose `training` flag symbolic tracing freezes as a constant (modules keep theirs)."""


def _mode_frozen_ops(graph: torch.fx.Graph) -> list[str]:
    return [f"{n.name} ({_TRAINING_BAKED[n.target]})" for n in graph.nodes
            if n.op in ("call_function", "call_method") and n.target in _TRAINING_BAKED]  # fmt: skip


def prepare_qat(model: nn.Module, input_size: tuple[int, ...], pow2_modules: list[str]) -> GraphModule:
    """The fake-quant (QAT) form of `model` in training mode; `model`'s parameters are reused, not copied.

    Traced in eval mode: functional ops whose training flag tracing freezes (timm's dropout and drop path)
    then keep their inference behaviour in the int8 model, and are inactive during QAT fine-tuning.
    """
    model = plain_torch_layers_(model.cpu().eval())
    example = (torch.zeros(2, *input_size),)  # only traced, never run
    try:
        with _quiet_fx():
            prepared = prepare_qat_fx(model, qconfig_mapping(pow2_modules), example_inputs=example)
    except Exception as err:
        raise RuntimeError(f"qat: FX could not trace {type(model).__name__} for int8 quantization: {err}") from err
    frozen = _mode_frozen_ops(prepared.graph)
    if frozen:
        log.info("qat: traced in eval mode, these ops act as at inference during QAT too: %s", ", ".join(frozen[:8]))
    prepared.train()
    for module in prepared.modules():
        if isinstance(module, _ConvBnNd) and bool((module.bn.weight == 0).any()):
            module._enable_slow_path_for_better_numerical_stability = True  # the approximate fold divides by gamma
    _picklable_qconfigs_(prepared)
    return prepared


def _picklable_qconfigs_(prepared: GraphModule) -> None:
    """Drop the device closures FX binds into every qconfig, so the prepared model pickles (the stage cache).

    They only pick the device of observers created later; conversion runs on the CPU.
    """

    def plain(qconfig: QConfig | None) -> QConfig | None:
        if qconfig is None:
            return None
        strip = lambda ctr: _PartialWrapper(ctr.p) if isinstance(ctr, _PartialWrapper) else ctr  # noqa: E731
        return QConfig(activation=strip(qconfig.activation), weight=strip(qconfig.weight))

    for module in prepared.modules():
        if getattr(module, "qconfig", None) is not None:
            module.qconfig = plain(module.qconfig)
    attrs = prepared.meta["_observed_graph_module_attrs"]
    attrs.node_name_to_qconfig = {name: plain(q) for name, q in attrs.node_name_to_qconfig.items()}
    # convert_fx looks for these in `meta`, which pickling (the stage cache) drops and deepcopy keeps;
    # an attribute is kept by pickling, and by deepcopy when listed as a preserved attribute.
    prepared._qat_observed_attrs = attrs
    prepared.meta.setdefault("_user_preserved_attributes", {})["_qat_observed_attrs"] = attrs


def _restore_meta_(prepared: nn.Module) -> None:
    """Put back what convert_fx needs into `meta` after the prepared model was unpickled."""
    attrs = getattr(prepared, "_qat_observed_attrs", None)
    if isinstance(prepared, GraphModule) and attrs is not None:
        prepared.meta.setdefault("_observed_graph_module_attrs", attrs)
        prepared.meta.setdefault("_user_preserved_attributes", {})["_qat_observed_attrs"] = attrs


def convert_int8(prepared: nn.Module) -> GraphModule:
    """A converted copy of the fake-quant model: int8 convolutions and linear layers (fbgemm), eval mode, CPU."""
    _restore_meta_(prepared)
    model = copy.deepcopy(prepared).cpu().eval()
    try:
        with _quiet_fx():
            converted = convert_fx(model)
    except Exception as err:
        raise RuntimeError(f"qat: int8 conversion failed: {err}") from err
    float_layers = [name for name, m in converted.named_modules() if type(m) in _FLOAT_WEIGHTED]
    float_layers += [n.name for n in converted.graph.nodes if n.op == "call_function" and n.target in _FLOAT_OPS]
    if float_layers:
        raise RuntimeError(
            f"qat: these layers were not quantized and would run in fp32: {', '.join(float_layers[:8])}"
            f"{' …' if len(float_layers) > 8 else ''}; the model is not fully int8-quantizable with FX"
        )
    return converted


_FLOAT_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)
_FLOAT_OPS = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d, nn.functional.linear)


def fp32_ops(converted: GraphModule) -> list[str]:
    """Ops the int8 graph runs in fp32 between int8 kernels (no int8 kernel for them): each follows a dequantize."""
    modules = dict(converted.named_modules())
    ops = []
    for node in converted.graph.nodes:
        if node.target != "dequantize":
            continue
        for user in node.users:
            if user.op == "output":
                continue
            kind = type(modules[user.target]).__name__ if user.op == "call_module" else str(user.target)
            ops.append(f"{user.name} ({kind})")
    return ops


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


# After qat the model is a fake-quant graph: torch-pruning cannot trace it, INQ's levels and low-rank factors need
# float weights, and a second qat would quantize twice. Stages that only train it may follow.
@register_stage("qat", config=QATConfig, may_follow={"distill", "train"})
def run_qat(state: ModelState | None, config: QATConfig, ctx: StageContext) -> StageOutput:
    """INT8 quantization-aware training: fake-quant fine-tuning, shipped as a real int8 model (x86 kernels)."""
    if state is None:
        raise ValueError("qat needs a trained input model: put a `train` (or pruning, INQ) stage before it")
    _check_can_quantize(state.model)
    pow2_modules = [name.rpartition(".")[0] for name in state.extras.get("inq", {})]
    names_before = {id(p): n for n, p in state.model.named_parameters()}
    prepared = prepare_qat(state.model, ctx.data.input_size, pow2_modules)
    state.fixed = _renamed_fixed(state.fixed, names_before, prepared)
    state.extras = _renamed_extras(state.extras, names_before, prepared)
    state.model = prepared.to(ctx.device)
    state.fixed.project_(prepared)

    observers, bn_stats = frozen_at(config, 0)
    freeze_(prepared, observers=False, bn_stats=bn_stats)  # calibrate in the mode the first epoch trains in
    calibration = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=False)
    training = config.epochs > 0
    calibrated = calibrate_(prepared, calibration, config.calibration_batches, ctx.device, training=training)
    freeze_(prepared, observers=observers, bn_stats=bn_stats)
    freezing = replace(ctx, on_epoch_end=_freezing_hook(prepared, config, ctx.on_epoch_end))
    report = freezing.fit(state, config, desc="qat", step=1)  # step 1: another data order than calibration's

    state.structure.append(StructuralChange("qat_prepare", {"backend": BACKEND, "pow2_modules": pow2_modules,
                                                            "input_size": list(ctx.data.input_size)}))  # fmt: skip
    state.artifact_format = "int8"
    metrics = _int8_metrics(prepared, pow2_modules)
    metrics["qat_calibration_batches"] = float(calibrated)
    return StageOutput(state, metrics=metrics, report=report)


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


def _new_names(names_before: dict[int, str], prepared: nn.Module) -> dict[str, str]:
    """Old parameter name -> name in the prepared model (fusion moves BatchNorms, the tensors are the same)."""
    return {names_before[id(p)]: n for n, p in prepared.named_parameters() if id(p) in names_before}


def _renamed_fixed(fixed: FixedWeights, names_before: dict[int, str], prepared: nn.Module) -> FixedWeights:
    """The same fixed weights, keyed by the prepared model's parameter names."""
    rename = _new_names(names_before, prepared)
    lost = [n for n in fixed.names() if n not in rename]
    if lost:
        raise RuntimeError(f"qat: fake quantization lost parameters fixed by an earlier stage: {lost[:5]}")
    state = fixed.state_dict()
    return FixedWeights.from_state_dict({k: {rename[n]: t for n, t in v.items()} for k, v in state.items()})


def _renamed_extras(extras: dict[str, Any], names_before: dict[int, str], prepared: nn.Module) -> dict[str, Any]:
    rename = _new_names(names_before, prepared)
    out = dict(extras)
    if "inq" in out:
        out["inq"] = {rename.get(n, n): v for n, v in out["inq"].items()}
    return out


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


def portable_state_dict(converted: nn.Module) -> dict[str, Any]:
    """The int8 model's state_dict with packed-weight objects (not loadable with weights_only) unpacked."""
    state_dict = converted.state_dict()
    # Module versions decide how quantized modules read their entries back (quantized Linear changed layout).
    out: dict[str, Any] = {"_metadata": {k: dict(v) for k, v in getattr(state_dict, "_metadata", {}).items()}}
    for key, value in state_dict.items():
        if isinstance(value, torch._C.ScriptObject):
            kind = value._type().qualified_name().rpartition(".")[2]
            if kind != "LinearPackedParamsBase":
                raise RuntimeError(f"int8 artifact: cannot store packed object {key!r} of type {kind}")
            weight, bias = torch.ops.quantized.linear_unpack(value)
            value = {"packed_linear": weight, "bias": bias}
        elif isinstance(value, torch.Tensor) and value.is_quantized and value.qscheme() == torch.per_channel_affine:
            value = _compact_per_channel(value.detach())
        elif isinstance(value, torch.Tensor):
            value = value.detach()
        out[key] = value
    return out


def _compact_per_channel(q: torch.Tensor) -> dict[str, Any] | torch.Tensor:
    """int8 values, fp32 scales and int8 zero points: a per-channel qtensor serialises its scales and zero
    points as fp64 / int64 (16 bytes a channel, 10 % of a MobileNet); observers compute them in fp32."""
    scales, zero_points = q.q_per_channel_scales(), q.q_per_channel_zero_points()
    if not (torch.equal(scales.float().double(), scales) and zero_points.abs().max() <= 127):
        return q
    return {"int_repr": q.int_repr(), "scales": scales.float(), "zero_points": zero_points.to(torch.int8),
            "axis": q.q_per_channel_axis()}  # fmt: skip


def _expand_per_channel(item: dict[str, Any]) -> torch.Tensor:
    return torch._make_per_channel_quantized_tensor(
        item["int_repr"], item["scales"].double(), item["zero_points"].long(), item["axis"]
    )


def load_portable_state_dict_(converted: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load `portable_state_dict` output, re-packing linear weights for this machine's int8 engine."""
    state_dict = dict(state_dict)
    metadata = state_dict.pop("_metadata", {})
    for key, value in state_dict.items():
        if isinstance(value, dict) and "int_repr" in value:
            state_dict[key] = _expand_per_channel(value)
        elif isinstance(value, dict) and "packed_linear" in value:
            state_dict[key] = torch.ops.quantized.linear_prepack(value["packed_linear"], value["bias"])
    full = OrderedDict(state_dict)
    full._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    converted.load_state_dict(full, strict=True)


@register_structural_change("qat_prepare")
def _replay_qat_prepare(model: nn.Module, args: dict[str, Any]) -> GraphModule:
    """The fake-quant graph FX made of the float model, with the same power-of-two weight quantizers."""
    if args["backend"] != BACKEND:
        raise ValueError(f"int8 artifact: backend {args['backend']!r} is not supported (only {BACKEND!r})")
    return prepare_qat(model, tuple(args["input_size"]), list(args["pow2_modules"]))


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
