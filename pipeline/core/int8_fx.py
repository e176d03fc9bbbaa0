"""INT8 models with PyTorch's FX graph mode (`torch.ao.quantization.quantize_fx`, x86 backend): insert
fake quantization (`prepare_qat`), convert to real int8 kernels (`convert_int8`), and write / read the
converted model's values as plain tensors (`portable_state_dict`).

Used by the `qat` stage (which trains the fake-quant model) and by the export to ONNX QDQ. Why FX and not
PT2E, and the measured figures behind that choice, are in BENCHMARKS.md ("INT8 flow"). What this module
handles so that timm models quantize (each explained where it is done):

* timm's `BatchNormAct2d` and `Linear` subclasses are swapped for plain torch modules (same tensors), or FX
  would trace them into functional ops with the training flag baked in (`plain_torch_layers_`);
* tracing runs in eval mode, so functional dropout / drop path keep their inference behaviour;
* conv-BN modules whose BatchNorm has a zero gamma (timm's `zero_init_last`) use torch's exact folding path,
  as the approximate fold divides by gamma (`prepare_qat`);
* the qconfigs FX binds to device closures are made picklable, so the stage cache can store the model;
* INQ layers get `PowerOfTwoWeightObserver`, so their powers of two stay exact integers in int8;
* a conv or linear layer left in fp32 after conversion is an error, never a silent fallback (`convert_int8`), but
  for the layers asked to stay in floating point (`fp32_modules`, the qat stage's fallback).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any

import timm.layers
import torch
from torch import nn
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
from torch.ao.quantization import FakeQuantize, QConfig, QConfigMapping, get_default_qat_qconfig_mapping
from torch.ao.quantization.observer import PerChannelMinMaxObserver, _PartialWrapper
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from torch.fx import GraphModule

log = logging.getLogger("pipeline")

BACKEND = "x86"
"""PyTorch's quantized engine whose qconfig and kernels (fbgemm) the int8 model uses."""

POW2_OCTAVES = 6
"""Octaves below a channel's largest magnitude that int8 holds exactly on a power-of-two step (2^6 = 64 <= 127)."""


# --- which quantizer each layer gets ------------------------------------------------------------


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


def qconfig_mapping(pow2_modules: list[str], fp32_modules: tuple[str, ...] = ()) -> QConfigMapping:
    """PyTorch's x86 QAT defaults (per-channel symmetric int8 weights, per-tensor uint8 activations with the
    7-bit range fbgemm needs without VNNI); INQ layers (`pow2_modules`) keep their powers of two; `fp32_modules`
    (conv / linear layers kept in floating point, the fp32 fallback) get no qconfig: FX leaves them float modules,
    their inputs dequantized and their outputs quantized again for the int8 ops around them."""
    mapping = get_default_qat_qconfig_mapping(BACKEND)
    default = mapping.global_qconfig
    for name in pow2_modules:
        mapping.set_module_name(name, QConfig(activation=default.activation, weight=POW2_WEIGHT_FAKE_QUANT))
    for name in fp32_modules:
        mapping.set_module_name(name, None)
    return mapping


# --- prepare (insert fake quantization) and convert (int8 kernels) -------------------------------


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


def prepare_qat(
    model: nn.Module, input_size: tuple[int, ...], pow2_modules: list[str], fp32_modules: tuple[str, ...] = ()
) -> GraphModule:
    """The fake-quant (QAT) form of `model` in training mode; `model`'s parameters are reused, not copied.

    Traced in eval mode: functional ops whose training flag tracing freezes (timm's dropout and drop path)
    then keep their inference behaviour in the int8 model, and are inactive during QAT fine-tuning.
    """
    model = plain_torch_layers_(model.cpu().eval())
    example = (torch.zeros(2, *input_size),)  # only traced, never run
    try:
        with _quiet_fx():
            prepared = prepare_qat_fx(model, qconfig_mapping(pow2_modules, fp32_modules), example_inputs=example)
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
    prepared._fp32_modules = tuple(fp32_modules)  # conversion accepts these as float layers, and only these
    prepared.meta["_user_preserved_attributes"]["_fp32_modules"] = prepared._fp32_modules
    return prepared


def _plain_qconfig(qconfig: QConfig | None) -> QConfig | None:
    if qconfig is None:
        return None
    strip = lambda ctr: _PartialWrapper(ctr.p) if isinstance(ctr, _PartialWrapper) else ctr  # noqa: E731
    return QConfig(activation=strip(qconfig.activation), weight=strip(qconfig.weight))


def picklable_qconfigs_(module: nn.Module) -> None:
    """Drop the device closures FX binds into the qconfig of every submodule, so `module` pickles (the stage
    cache). FX sets them on the prepared model and on the float model it was traced from. They only pick the
    device of observers created later; conversion runs on the CPU."""
    for submodule in module.modules():
        if getattr(submodule, "qconfig", None) is not None:
            submodule.qconfig = _plain_qconfig(submodule.qconfig)


def _picklable_qconfigs_(prepared: GraphModule) -> None:
    """`picklable_qconfigs_` for the prepared model, including the qconfigs convert_fx reads from its `meta`."""
    picklable_qconfigs_(prepared)
    attrs = prepared.meta["_observed_graph_module_attrs"]
    attrs.node_name_to_qconfig = {name: _plain_qconfig(q) for name, q in attrs.node_name_to_qconfig.items()}
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
    fallback = getattr(prepared, "_fp32_modules", ())
    float_layers = [name for name, m in converted.named_modules()
                    if type(m) in _FLOAT_WEIGHTED and not _within(name, fallback)]  # fmt: skip
    float_layers += [n.name for n in converted.graph.nodes if n.op == "call_function" and n.target in _FLOAT_OPS]
    if float_layers:
        raise RuntimeError(
            f"qat: these layers were not quantized and would run in fp32: {', '.join(float_layers[:8])}"
            f"{' …' if len(float_layers) > 8 else ''}; the model is not fully int8-quantizable with FX"
        )
    return converted


def _within(name: str, modules: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `modules` or inside one (FX fuses a kept conv with its BatchNorm)."""
    return any(name == m or name.startswith(f"{m}.") for m in modules)


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


# --- the converted model's values as plain tensors ------------------------------------------------


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
