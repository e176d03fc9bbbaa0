"""Lower an int8 model (the `qat` stage's FX-converted module) to a float graph with explicit QDQ pairs.

Deployment runtimes read int8 as *QDQ*: a float graph in which every quantized tensor passes through
QuantizeLinear → DequantizeLinear and every weight is an int8 constant behind a DequantizeLinear. ONNX
Runtime fuses `DQ → Conv → Q` into its int8 kernels (QLinearConv, U8S8), OpenVINO turns the pairs into
FakeQuantize and runs its int8 kernels. This module rewrites the converted torch graph into exactly that,
using the values the torch int8 model holds (the scales and zero points QAT learned; no new calibration):

- `quantize_per_tensor` and `dequantize` become identities; instead, **every node whose output is a
  quantized tensor in the torch int8 model** is followed by a Q/DQ pair with that tensor's scale, zero
  point and dtype (uint8 activations). Which outputs are quantized, and with what parameters, is read by
  running the int8 model once on a sample input (`observe_qparams`), so ops that keep their input's
  parameters (max pool, flatten) or fix their own (hardsigmoid) are covered without a table.
- int8 conv and linear modules become `DequantizedWeightConv` / `DequantizedWeightLinear`: the int8
  weights with their per-channel scales behind `dequantize_per_channel`, the bias as int32 at
  scale = input scale × weight scale (as ONNX Runtime's own quantizer writes it), then the float op.
- the other quantized modules and `torch.ops.quantized.*` functions become their float op (the Q/DQ
  after them restores the int8 semantics).

An op with no float counterpart here fails with `QDQExportError` naming the node and op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import nn
from torch.fx import Graph, GraphModule, Interpreter, Node

QD = torch.ops.quantized_decomposed
INT32_RANGE = (-(2**31), 2**31 - 1)
# torch quantized dtype -> (plain dtype the runtimes see, quant_min, quant_max)
QDTYPES = {torch.quint8: (torch.uint8, 0, 255), torch.qint8: (torch.int8, -128, 127)}


class QDQExportError(RuntimeError):
    """A node of the int8 graph that this exporter cannot express as QDQ (named in the message)."""


QParams = tuple[float, int, torch.dtype]  # scale, zero point, torch quantized dtype


class _Observer(Interpreter):
    """Runs the int8 graph and records (scale, zero point, dtype) of every per-tensor quantized output."""

    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self.qparams: dict[str, QParams] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_quantized and out.qscheme() == torch.per_tensor_affine:
            self.qparams[n.name] = (float(out.q_scale()), int(out.q_zero_point()), out.dtype)
        return out


@torch.inference_mode()
def observe_qparams(converted: GraphModule, example: torch.Tensor) -> dict[str, QParams]:
    """Node name -> quantization parameters of its output, for every node that outputs a quantized tensor."""
    observer = _Observer(converted)
    observer.run(example)
    return observer.qparams


def _weight_qdq(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(int8 values, fp32 scales, int32 zero points, axis) of a quantized module's weight, per channel."""
    w = module.weight()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales, zero_points, axis = w.q_per_channel_scales(), w.q_per_channel_zero_points(), w.q_per_channel_axis()
    else:  # one scale for the tensor: the same form with a repeated scale
        channels = w.shape[0]
        scales = torch.full((channels,), w.q_scale(), dtype=torch.float64)
        zero_points, axis = torch.full((channels,), w.q_zero_point(), dtype=torch.int64), 0
    return w.int_repr(), scales.float(), zero_points.to(torch.int32), axis


class _DequantizedWeight(nn.Module):
    """Shared part of the int8-weight modules: int8 weights and an int32 bias, each behind a DequantizeLinear."""

    def __init__(self, qmodule: nn.Module, input_scale: float) -> None:
        super().__init__()
        weight, scales, zero_points, axis = _weight_qdq(qmodule)
        if bool((zero_points != 0).any()):
            raise QDQExportError(f"{type(qmodule).__name__}: asymmetric int8 weights are not supported")
        self.axis = axis
        self.register_buffer("weight_int8", weight)
        self.register_buffer("weight_scale", scales)
        self.register_buffer("weight_zero_point", zero_points)
        bias = qmodule.bias()
        if bias is None:
            self.bias_int32 = None
        else:
            bias_scale = (scales.double() * input_scale).float()
            q = torch.round(bias.detach().double() / bias_scale.double()).clamp(*INT32_RANGE).to(torch.int32)
            self.register_buffer("bias_int32", q)
            self.register_buffer("bias_scale", bias_scale)

    def weight(self) -> torch.Tensor:
        return QD.dequantize_per_channel(self.weight_int8, self.weight_scale, self.weight_zero_point, self.axis,
                                         -128, 127, torch.int8)  # fmt: skip

    def bias(self) -> torch.Tensor | None:
        if self.bias_int32 is None:
            return None
        zeros = torch.zeros_like(self.bias_int32)
        return QD.dequantize_per_channel(self.bias_int32, self.bias_scale, zeros, 0, *INT32_RANGE, torch.int32)


_CONV_FN = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}


class DequantizedWeightConv(_DequantizedWeight):
    """A quantized convolution as `conv(x, DQ(int8 W), DQ(int32 b))` (+ the fused add and/or ReLU)."""

    def __init__(self, qconv: nn.Module, input_scale: float, *, add: bool, relu: bool) -> None:
        super().__init__(qconv, input_scale)
        if getattr(qconv, "padding_mode", "zeros") != "zeros":
            raise QDQExportError(f"{type(qconv).__name__}: padding_mode {qconv.padding_mode!r} is not supported")
        self.conv = _CONV_FN[self.weight_int8.dim() - 2]
        self.stride, self.padding = qconv.stride, qconv.padding
        self.dilation, self.groups = qconv.dilation, qconv.groups
        self.add, self.relu = add, relu

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x, self.weight(), self.bias(), self.stride, self.padding, self.dilation, self.groups)
        if self.add:
            y = y + extra
        return torch.relu(y) if self.relu else y


class DequantizedWeightLinear(_DequantizedWeight):
    """A quantized linear layer as `linear(x, DQ(int8 W), DQ(int32 b))` (+ a fused activation)."""

    def __init__(self, qlinear: nn.Module, input_scale: float, activation: Callable | None) -> None:
        super().__init__(qlinear, input_scale)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight(), self.bias())
        return self.activation(y) if self.activation is not None else y


# int8 conv modules -> (fused add, fused ReLU); int8 linear modules -> fused activation
_CONVS = {nnq.Conv1d: (False, False), nnq.Conv2d: (False, False), nnq.Conv3d: (False, False),
          nniq.ConvReLU1d: (False, True), nniq.ConvReLU2d: (False, True), nniq.ConvReLU3d: (False, True),
          nniq.ConvAdd2d: (True, False), nniq.ConvAddReLU2d: (True, True)}  # fmt: skip
_LINEARS: dict[type, Callable[[nn.Module], Callable | None]] = {
    nnq.Linear: lambda m: None,
    nniq.LinearReLU: lambda m: torch.relu,
    nniq.LinearTanh: lambda m: torch.tanh,
    nniq.LinearLeakyReLU: lambda m: lambda y, slope=m.negative_slope: nn.functional.leaky_relu(y, slope),
}


def _weighted(module: nn.Module, input_scale: float) -> nn.Module | None:
    """The QDQ form of an int8 conv or linear module, or None if `module` is not one."""
    if type(module) in _CONVS:
        add, relu = _CONVS[type(module)]
        return DequantizedWeightConv(module, input_scale, add=add, relu=relu)
    if type(module) in _LINEARS:
        return DequantizedWeightLinear(module, input_scale, _LINEARS[type(module)](module))
    return None


def _float_norm(module: nn.Module, float_type: type[nn.Module], **kwargs: Any) -> nn.Module:
    out = float_type(**kwargs)
    out.load_state_dict({k: v for k, v in module.state_dict().items() if k in out.state_dict()}, strict=True)
    return out.eval()


# Quantized modules without weights to dequantize -> the float module computing the same (before requantization).
_FLOAT_MODULES: dict[type, Callable[[nn.Module], nn.Module]] = {
    nnq.Hardswish: lambda m: nn.Hardswish(),
    nnq.ReLU6: lambda m: nn.ReLU6(),
    nnq.Sigmoid: lambda m: nn.Sigmoid(),
    nnq.LeakyReLU: lambda m: nn.LeakyReLU(m.negative_slope),
    nnq.ELU: lambda m: nn.ELU(m.alpha),
    nnq.Softmax: lambda m: nn.Softmax(m.dim),
    nnq.Dropout: lambda m: nn.Identity(),
    nnq.BatchNorm2d: lambda m: _float_norm(m, nn.BatchNorm2d, num_features=m.num_features, eps=m.eps),
    nnq.BatchNorm3d: lambda m: _float_norm(m, nn.BatchNorm3d, num_features=m.num_features, eps=m.eps),
    nniq.BNReLU2d: lambda m: nn.Sequential(
        _float_norm(m, nn.BatchNorm2d, num_features=m.num_features, eps=m.eps), nn.ReLU()
    ),
    nnq.LayerNorm: lambda m: _float_norm(
        m, nn.LayerNorm, normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None
    ),
    nnq.GroupNorm: lambda m: _float_norm(
        m, nn.GroupNorm, num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps
    ),
}


def _is_quantized_module(module: nn.Module) -> bool:
    """An int8 module (torch.ao.nn.quantized, .intrinsic.quantized); float fused modules (a conv kept in floating
    point with its BatchNorm, `torch.ao.nn.intrinsic.ConvBn2d`) run as they are."""
    return type(module).__module__.startswith("torch.ao.nn") and ".quantized" in type(module).__module__


def unsupported_ops(converted: GraphModule) -> list[str]:
    """Nodes of the int8 graph with no QDQ form here, each as "node (op)"; empty when it lowers."""
    modules = dict(converted.named_modules())
    out = []
    for node in converted.graph.nodes:
        if node.op == "call_module" and _is_quantized_module(module := modules[node.target]):
            kind = type(module)
            if kind not in _CONVS and kind not in _LINEARS and kind not in _FLOAT_MODULES:
                out.append(f"{node.target} ({kind.__module__}.{kind.__name__})")
        elif _is_quantized_function(node) and _quantized_name(node) not in _QUANTIZED_FUNCTIONS:
            out.append(f"{node.name} (torch.ops.quantized.{_quantized_name(node)})")
    return out


def _relu_of(fn: Callable) -> Callable:
    return lambda *args: torch.relu(fn(*args))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


F = nn.functional
# torch.ops.quantized.<name> -> (float function, positional argument names, keyword names), by the op's schema
# (the trailing output scale / zero point are dropped: the Q/DQ after the node carries them).
_QUANTIZED_FUNCTIONS: dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]] = {
    "add": (torch.add, ("qa", "qb"), ()),
    "add_relu": (_relu_of(torch.add), ("qa", "qb"), ()),
    "mul": (torch.mul, ("qa", "qb"), ()),
    "mul_relu": (_relu_of(torch.mul), ("qa", "qb"), ()),
    "add_scalar": (torch.add, ("qa", "b"), ()),
    "mul_scalar": (torch.mul, ("qa", "b"), ()),
    "matmul": (torch.matmul, ("qa", "qb"), ()),
    "cat": (torch.cat, ("qx", "dim"), ()),
    "hardswish": (F.hardswish, ("input",), ()),
    "sigmoid": (torch.sigmoid, ("qx",), ()),
    "softmax": (torch.softmax, ("qx", "dim"), ()),
    "relu6": (F.relu6, ("qx",), ()),
    "leaky_relu": (F.leaky_relu, ("qx", "negative_slope"), ()),
    "elu": (F.elu, ("self", "alpha"), ()),
    "celu": (F.celu, ("self", "alpha"), ()),
    "clamp": (torch.clamp, ("qx", "min", "max"), ()),
    "threshold": (F.threshold, ("qx", "threshold", "value"), ()),
    "dropout": (_identity, ("self",), ()),  # inference: dropout is the identity
    "layer_norm": (F.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps"), ()),
    "group_norm": (F.group_norm, ("input", "num_groups", "weight", "bias", "eps"), ()),
    "instance_norm": (F.instance_norm, ("input",), ("weight", "bias", "eps")),
    "batch_norm2d": (F.batch_norm, ("qx", "mean", "var", "weight", "bias"), ("eps",)),
}


def _schema_arguments(node: Node) -> dict[str, Any]:
    """The call's arguments by the name its schema gives them, defaults filled in."""
    target = node.target
    schema = (target.default if hasattr(target, "default") else target)._schema
    bound = {}
    for i, argument in enumerate(schema.arguments):
        if i < len(node.args):
            bound[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _is_quantized_function(node: Node) -> bool:
    return node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith("torch._ops.quantized")


def _quantized_name(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _float_call(node: Node) -> tuple[Callable, tuple[Any, ...], dict[str, Any]] | None:
    """The float function and arguments for a `torch.ops.quantized.*` call, or None if `node` is not one."""
    if not _is_quantized_function(node):
        return None
    fn, positional, keywords = _QUANTIZED_FUNCTIONS[_quantized_name(node)]
    bound = _schema_arguments(node)
    return fn, tuple(bound[k] for k in positional), {k: bound[k] for k in keywords}


def _is_quantize(node: Node) -> bool:
    return node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.quantize_per_channel)


def _is_dequantize(node: Node) -> bool:
    return (node.op == "call_method" and node.target == "dequantize") or (
        node.op == "call_function" and node.target is torch.dequantize
    )


def _qdq(graph: Graph, value: Node, qparams: QParams) -> Node:
    scale, zero_point, qdtype = qparams
    if qdtype not in QDTYPES:
        raise QDQExportError(f"int8 export: {value.name!r} is quantized as {qdtype}, only quint8/qint8 are supported")
    dtype, qmin, qmax = QDTYPES[qdtype]
    q = graph.call_function(QD.quantize_per_tensor.default, (value, scale, zero_point, qmin, qmax, dtype))
    return graph.call_function(QD.dequantize_per_tensor.default, (q, scale, zero_point, qmin, qmax, dtype))


def to_qdq(converted: GraphModule, example: torch.Tensor) -> GraphModule:
    """A float GraphModule computing what the int8 `converted` model computes, in QDQ form (see module doc).

    `example`: one input batch of the right shape (values do not matter) to read the quantized outputs.
    """
    missing = unsupported_ops(converted)
    if missing:
        raise QDQExportError(f"int8 export: no QDQ form for {len(missing)} op(s): {', '.join(missing[:6])}")
    qparams = observe_qparams(converted, example)
    root = copy.deepcopy(converted)
    modules = dict(root.named_modules())
    graph, env = Graph(), {}

    def arg(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for node in converted.graph.nodes:
        if _is_quantize(node) or _is_dequantize(node):
            out = env[node.args[0]]
        elif node.op == "call_module" and (replacement := _module_replacement(node, modules, qparams)) is not None:
            root.set_submodule(node.target, replacement)
            out = graph.call_module(node.target, arg(node.args), arg(node.kwargs))
        elif (call := _float_call(node)) is not None:
            fn, args, kwargs = call
            out = graph.call_function(fn, arg(args), arg(kwargs))
        else:
            out = graph.node_copy(node, lambda n: env[n])
        if node.name in qparams and node.op != "output":
            out = _qdq(graph, out, qparams[node.name])
        env[node] = out
    lowered = GraphModule(root, graph, class_name="QDQModel")
    lowered.graph.eliminate_dead_code()
    lowered.recompile()
    lowered.delete_all_unused_submodules()
    return lowered.eval()


def _module_replacement(node: Node, modules: dict[str, nn.Module], qparams: dict[str, QParams]) -> nn.Module | None:
    """The float/QDQ module replacing a quantized module call, None for a module that stays as it is."""
    module = modules[node.target]
    if not _is_quantized_module(module):
        return None
    source = node.args[0]
    if type(module) in _CONVS or type(module) in _LINEARS:
        if not (isinstance(source, Node) and source.name in qparams):
            raise QDQExportError(f"int8 export: the input of {node.target!r} is not a quantized tensor")
        return _weighted(module, qparams[source.name][0])
    return _FLOAT_MODULES[type(module)](module)


__all__ = ["QDQExportError", "observe_qparams", "to_qdq", "unsupported_ops"]
