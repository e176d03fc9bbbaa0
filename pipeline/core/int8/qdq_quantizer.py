"""Which ops of a captured graph run in int8, for runtimes that read QDQ graphs (ONNX Runtime, OpenVINO): our torchao
`Quantizer`.

torchao ships `X86InductorQuantizer`, which annotates for Inductor's fused CPU kernels: a convolution that feeds a
residual add keeps a float output (Inductor fuses the add into it), and so does the classifier. Exported to ONNX,
those convolutions, the adds and the classifier then run in float, with their weights dequantized at every call:
3.2x slower than FX's graph at batch 1 in ONNX Runtime on resnet10t (BENCHMARKS.md, "int8 on PT2E"). ONNX Runtime
and OpenVINO fuse `DequantizeLinear -> op -> QuantizeLinear` groups into int8 kernels, so this quantizer gives every
op that has such a kernel quantized inputs *and* a quantized output, as PyTorch's FX x86 backend did:

- a **convolution or linear layer** (its "unit": the op, the BatchNorm folded into it, a ReLU / ReLU6 after it):
  input uint8 per tensor, weight int8 per output channel (INQ layers: the power-of-two rule), the unit's output
  uint8. Layers in `Int8Plan.fp32_layers` are left alone: float in, float out, float weights.
- a **residual add** (two tensors), with a ReLU after it: both inputs and the output quantized.
- ops whose output has the **same quantization as their input** (max / average pooling, zero padding, flatten,
  reshape, permute): share their input's scale and zero point, when the input is quantized.

Everything else (softmax, GELU, LayerNorm, hardswish, the squeeze-excitation multiply) stays float between a
dequantize and the next layer's quantize. Activations: uint8, zero point, per tensor, range [0, 127]
(`Int8Scheme.activation_qmax`); ranges are moving-average min / max fake quantizers, so one graph serves
post-training calibration and quantization-aware training.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.fake_quantize import FakeQuantize
from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from pipeline.core.int8.backend import Int8Plan, Int8Scheme
from pipeline.core.int8.pow2 import PowerOfTwoWeightObserver

ANNOTATION = "quantization_annotation"
UNIT_END = "int8_unit_end"  # node.meta of a conv whose unit ends at another node: its folded BatchNorm's name
IN_UNIT = "int8_in_unit"  # node.meta of the ops a graph pass added inside a unit (never annotated on their own)

aten = torch.ops.aten
WEIGHTED = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
ADDS = {aten.add.Tensor, aten.add_.Tensor}
SAME_QPARAMS = {
    aten.max_pool1d.default, aten.max_pool2d.default, aten.avg_pool1d.default, aten.avg_pool2d.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim, aten.pad.default,
    aten.constant_pad_nd.default, aten.flatten.using_ints, aten.reshape.default, aten.view.default,
    aten.permute.default,
}  # fmt: skip


def layer_of(node: Node) -> str | None:
    """The module name of a conv / linear node's layer, from its weight's parameter name (`layer1.0.conv1`)."""
    weight = node.args[1]
    while isinstance(weight, Node) and weight.op != "get_attr":
        weight = weight.args[0] if weight.args and isinstance(weight.args[0], Node) else None
    return weight.target.rpartition(".")[0] if isinstance(weight, Node) else None


class QDQQuantizer(Quantizer):
    """Annotates a captured (torch.export) graph for QDQ runtimes: see the module docstring."""

    def __init__(self, plan: Int8Plan, scheme: Int8Scheme) -> None:
        super().__init__()
        self.plan = plan
        self.activation = QuantizationSpec(
            dtype=torch.uint8, quant_min=0, quant_max=scheme.activation_qmax, qscheme=torch.per_tensor_affine,
            observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver),
        )  # fmt: skip
        weights = dict(dtype=torch.int8, quant_min=scheme.weight_qmin, quant_max=scheme.weight_qmax,
                       qscheme=torch.per_channel_symmetric, ch_axis=0)  # fmt: skip
        self.weight = QuantizationSpec(
            **weights, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver)
        )
        self.pow2_weight = QuantizationSpec(
            **weights, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=PowerOfTwoWeightObserver)
        )

    def annotate(self, model: GraphModule) -> GraphModule:
        self._named = {n.name: n for n in model.graph.nodes}
        for node in model.graph.nodes:
            if node.op != "call_function" or ANNOTATION in node.meta or node.meta.get(IN_UNIT):
                continue
            if node.target in WEIGHTED:
                self._annotate_layer(node)
            elif node.target in ADDS and all(isinstance(a, Node) for a in node.args[:2]):
                self._annotate_add(node)
            elif node.target in SAME_QPARAMS and isinstance(node.args[0], Node) and self._quantized(node.args[0]):
                node.meta[ANNOTATION] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: self.activation},
                    output_qspec=SharedQuantizationSpec((node.args[0], node)),
                    _annotated=True,
                )
        return model

    def validate(self, model: GraphModule) -> None:
        """Every layer the plan names exists in the graph (a misspelt name would silently quantize it)."""
        layers = {layer_of(n) for n in model.graph.nodes if n.op == "call_function" and n.target in WEIGHTED}
        missing = sorted(set(self.plan.fp32_layers) - layers)
        if missing:
            raise ValueError(f"int8: fp32 layers not in the captured graph: {', '.join(missing[:5])}")

    def _annotate_layer(self, node: Node) -> None:
        layer = layer_of(node)
        if layer in self.plan.fp32_layers:
            return
        weight = self.pow2_weight if layer in self.plan.pow2_layers else self.weight
        end = self._named[node.meta[UNIT_END]] if UNIT_END in node.meta else node
        activation = _only_user(end, ACTIVATIONS)
        node.meta[ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={node.args[0]: self.activation, node.args[1]: weight}, _annotated=True
        )
        self._end_unit(node, activation or end)

    def _annotate_add(self, node: Node) -> None:
        node.meta[ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={a: self.activation for a in node.args[:2]}, _annotated=True
        )
        self._end_unit(node, _only_user(node, ACTIVATIONS) or node)

    def _end_unit(self, start: Node, end: Node) -> None:
        """Quantize `end`'s output; the nodes from `start` to `end` count as annotated (nothing else claims them)."""
        if end is start:
            start.meta[ANNOTATION].output_qspec = self.activation
        else:
            end.meta[ANNOTATION] = QuantizationAnnotation(output_qspec=self.activation, _annotated=True)

    def _quantized(self, node: Node) -> bool:
        annotation = node.meta.get(ANNOTATION)
        return annotation is not None and annotation.output_qspec is not None


def _only_user(node: Node, targets: set) -> Node | None:
    """The one user of `node` if it is a call to one of `targets`, else None."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in targets:
        return users[0]
    return None
