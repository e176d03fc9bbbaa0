"""The default int8 backend: PT2E through torchao (`torch.export` capture, `prepare_pt2e`, `convert_pt2e`).

- **Capture** with `torch.export` in eval mode, the batch dimension dynamic: any model torch.export takes, including
  timm's TF ports whose "same" padding FX could not trace (`pt2e_graph.capture`).
- **Fake quantization** where `QDQQuantizer` says (int8 kernels in ONNX Runtime and OpenVINO), with BatchNorm folded
  into each convolution as quantization-aware training computes it (`pt2e_graph.fuse_bn_for_qat_`). One graph serves
  post-training calibration (`qat: {epochs: 0}`) and quantization-aware training.
- **The fake-quant model** (`FakeQuantGraph`) shares its parameters and BatchNorm statistics with the float model, so
  fixed weights (pruned zeros, INQ's frozen powers of two) are kept by the shared training loop by their usual names,
  and a later stage can prune the float model and quantize it again. `train()` / `eval()` switch its BatchNorm nodes;
  it pickles as its float model, its plan and its fake quantizers' state, and is captured again when unpickled (the
  stage cache), since a captured graph itself does not pickle.
- **Conversion**: BatchNorm folded with its running statistics (`pt2e_graph.fold_bn_`), `convert_pt2e` writes
  quantize / dequantize ops with int8 weights; each layer's int8 weight is kept as `<layer>.int8_weight`.
- **The artifact** holds the converted graph as torch.export's own serialized program (`torch.export.save`; JSON
  graph, raw tensors, no pickled code), its JSON deflated: loading it needs no capture, and it exports to ONNX as is.

In torch eager the converted model runs reference quantize / dequantize ops around fp32 kernels (torch has no eager
int8 kernels for PT2E models): its accuracy is the int8 model's, its torch latency is not what ships; the runtimes'
are (`torch_int8_kernels = False`).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
import zipfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from pipeline.core.int8.backend import Int8Plan, QuantizationBackend, register_backend
from pipeline.core.int8.pow2 import PowerOfTwoWeightObserver
from pipeline.core.int8.pt2e_graph import (
    BATCH_NORM,
    capture,
    fold_bn_,
    fuse_bn_for_qat_,
    set_bn_training_,
    standalone_bn_as_affine_,
)
from pipeline.core.int8.qdq_quantizer import ACTIVATIONS, WEIGHTED, QDQQuantizer, layer_of

log = logging.getLogger("pipeline")

qd = torch.ops.quantized_decomposed
QUANTIZE = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor, qd.quantize_per_channel.default}
DEQUANTIZE = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor, qd.dequantize_per_channel.default}
SHAPE_OPS = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.flatten.using_ints,
             torch.ops.aten.permute.default, torch.ops.aten.pad.default}  # fmt: skip
INT8_WEIGHT = "int8_weight"  # each layer's int8 weight in a converted graph: `<layer>.int8_weight`
OWNER = "int8_backend"  # attribute naming the backend on a converted model


class FakeQuantGraph(GraphModule):
    """A float model under PT2E fake quantization (see the module docstring)."""

    def train(self, mode: bool = True) -> FakeQuantGraph:
        set_bn_training_(self, mode and not self.__dict__.get("_bn_frozen", False))
        return super().train(mode)

    def __reduce__(self):
        state = {k: v for k, v in self.state_dict().items() if k.startswith("activation_post_process")}
        flags = (self.__dict__.get("_bn_frozen", False), self.training)
        return _rebuild, (self.__dict__["_float_model"], self.__dict__["_plan"], state, flags)


def _rebuild(float_model: nn.Module, plan: dict, state: dict, flags: tuple[bool, bool]) -> FakeQuantGraph:
    """A pickled fake-quant graph: captured again from its float model and given back its fake quantizers' state."""
    prepared = PT2E.prepare(float_model, Int8Plan.from_dict(plan))
    missing, unexpected = prepared.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("activation_post_process")]
    if missing or unexpected:
        raise RuntimeError(f"int8 (pt2e): the captured graph's fake quantizers differ from the stored ones: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")  # fmt: skip
    prepared.__dict__["_bn_frozen"] = flags[0]
    return prepared.train(flags[1])


class Pt2eBackend(QuantizationBackend):
    name = "pt2e"
    summary = "PT2E through torchao: torch.export capture, QDQ for ONNX Runtime and OpenVINO (the default)"
    runtimes = frozenset({"onnxruntime", "openvino"})
    torch_int8_kernels = False
    self_contained = True

    def prepare(self, model: nn.Module, plan: Int8Plan) -> FakeQuantGraph:
        device = next(model.parameters()).device
        model.cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export warns about pytree registrations it does not use
            try:
                graph = capture(model, plan.input_size)
            except Exception as err:
                first = next(iter(str(err).strip().splitlines()), type(err).__name__)
                raise RuntimeError(
                    f"int8 (pt2e): torch.export could not capture {type(model).__name__}: {first}"
                ) from err
            fused = fuse_bn_for_qat_(graph)
            prepared = prepare_pt2e(graph, QDQQuantizer(plan, self.scheme))
        out = FakeQuantGraph(prepared, prepared.graph)
        out.meta.update(prepared.meta)
        out.__dict__.update(_float_model=model, _plan=plan.to_dict(), _bn_frozen=False, int8_fused_bn=fused)
        model.to(device)
        return out.to(device).train()

    def freeze_(self, prepared: nn.Module, *, observers: bool, bn_stats: bool) -> None:
        if observers:
            for quantizer in self.fake_quantizers(prepared):
                if not isinstance(quantizer.activation_post_process, PowerOfTwoWeightObserver):
                    quantizer.disable_observer()
        if bn_stats:
            prepared.__dict__["_bn_frozen"] = True
            set_bn_training_(prepared, False)

    def convert(self, prepared: nn.Module) -> GraphModule:
        model = copy.deepcopy(prepared).cpu()
        set_bn_training_(model, False)
        fold_bn_(model)
        _observe_folded_pow2_weights_(model)
        standalone_bn_as_affine_(model)
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in WEIGHTED:
                node.meta["int8_layer"] = layer_of(node)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_pt2e(model, fold_quantize=True)
        _name_int8_weights_(converted)
        out = GraphModule(converted, converted.graph)  # keeps only what the graph reads: no float weights
        setattr(out, OWNER, self.name)
        return out.eval()

    def encode(self, converted: nn.Module, plan: Int8Plan) -> dict[str, Any]:
        batch = torch.export.Dim("batch", min=1, max=4096)
        example = torch.zeros(2, *plan.input_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))
        program._example_inputs = None  # the archive would store the example batch (600 KB at 224 px)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return {"program": torch.frombuffer(bytearray(_deflate_json(buffer.getvalue())), dtype=torch.uint8)}

    def decode(self, payload: dict[str, Any], model: nn.Module | None) -> GraphModule:
        data = payload["program"].numpy().tobytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(io.BytesIO(data)).module()
        for name in ("train", "eval"):  # an exported program's module refuses train() / eval(); int8 has no modes
            module.__dict__.pop(name, None)
        setattr(module, OWNER, self.name)
        return module.eval()

    def owns(self, model: nn.Module) -> bool:
        return getattr(model, OWNER, None) == self.name

    def is_prepared(self, model: nn.Module) -> bool:
        return isinstance(model, FakeQuantGraph) or any(isinstance(m, FakeQuantizeBase) for m in model.modules())

    def exportable(self, converted: nn.Module, example: torch.Tensor) -> nn.Module:
        return converted  # already a QDQ graph: quantize_per_tensor / dequantize_per_* become QuantizeLinear / DQ

    def fake_quantizers(self, prepared: nn.Module) -> Iterable[nn.Module]:
        return [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]

    def int8_weights(self, converted: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for node in converted.graph.nodes:
            if node.op == "get_attr" and node.target.endswith(f".{INT8_WEIGHT}"):
                out[node.target.rpartition(".")[0]] = _attribute(converted, node.target)
        return out

    def weight_tensors(self, converted: nn.Module) -> list[torch.Tensor]:
        def qparam_only(node: Node) -> bool:  # a scale or zero point: read by quantize / dequantize ops, not as data
            return all(u.target in QUANTIZE | DEQUANTIZE and u.args[0] is not node for u in node.users)

        values = [_attribute(converted, n.target) for n in converted.graph.nodes
                  if n.op == "get_attr" and n.users and not qparam_only(n)]  # fmt: skip
        return [v for v in values if isinstance(v, torch.Tensor)]  # not the submodules of higher-order ops

    def float_ops(self, converted: nn.Module) -> list[str]:
        ops = []
        for node in converted.graph.nodes:
            if node.op != "call_function" or node.target in QUANTIZE | DEQUANTIZE | SHAPE_OPS:
                continue
            if any(_dequantized(a) for a in node.all_input_nodes) and not _requantized(node):
                ops.append(f"{node.name} ({getattr(node.target, '__name__', str(node.target))})")
        return ops


def _observe_folded_pow2_weights_(model: GraphModule) -> None:
    """Power-of-two weight rules see the weights as folded with BatchNorm's final running statistics (training
    updated those after the last forward the rule saw), as FX's conversion re-observed every weight it converted."""
    for node in model.graph.nodes:
        quantizer = model.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(getattr(quantizer, "activation_post_process", None), PowerOfTwoWeightObserver):
            source = node.args[0]
            if isinstance(source, Node) and source.op == "get_attr":
                quantizer.activation_post_process(_attribute(model, source.target).detach())


def _attribute(module: nn.Module, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _dequantized(node: Node) -> bool:
    return node.op == "call_function" and node.target in DEQUANTIZE


def _requantized(node: Node) -> bool:
    """Whether the op's output goes (through one ReLU / ReLU6) only into quantize ops: an int8 op in QDQ form."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in ACTIVATIONS:
        users = list(users[0].users)
    return bool(users) and all(u.op == "call_function" and u.target in QUANTIZE for u in users)


def _name_int8_weights_(converted: GraphModule) -> None:
    """Each conv / linear layer's int8 weight (a frozen constant convert_pt2e names `_frozen_paramN`) moves to
    `<layer>.int8_weight`, so the layer can be found in the converted graph and in its serialized program."""
    for node in converted.graph.nodes:
        layer = node.meta.get("int8_layer")
        weight = node.args[1] if layer and node.op == "call_function" and node.target in WEIGHTED else None
        if not (isinstance(weight, Node) and _dequantized(weight) and weight.args[0].op == "get_attr"):
            continue
        constant = weight.args[0]
        value = _attribute(converted, constant.target)
        converted.get_submodule(layer).register_buffer(INT8_WEIGHT, value)
        constant.target = f"{layer}.{INT8_WEIGHT}"
    converted.recompile()


def _deflate_json(archive: bytes) -> bytes:
    """torch.export's archive with its JSON members deflated (the graph: ~5 % of an int8 ResNet, 10x smaller so);
    tensors stay stored as they are, as torch.export.load reads them."""
    source, out = zipfile.ZipFile(io.BytesIO(archive)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            deflate = info.filename.endswith(".json")
            target.writestr(info, source.read(info.filename), zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return out.getvalue()


PT2E = register_backend(Pt2eBackend())

__all__ = ["BATCH_NORM", "PT2E", "FakeQuantGraph", "Pt2eBackend"]
