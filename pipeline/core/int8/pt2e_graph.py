"""Graph passes of the PT2E backend on a captured (torch.export) graph: capture, BatchNorm folded into its
convolution for quantization-aware training and again for conversion, BatchNorm's train / eval switch, and the
clean-up of a converted graph.

**BatchNorm in quantization-aware training.** The int8 model computes a convolution with BatchNorm folded into its
weights, so quantization-aware training fake-quantizes the folded weight w·γ/σ and divides the convolution's output
by γ/σ again before BatchNorm, which then still normalises with batch statistics and updates its running statistics
(Jacob et al. 2018; the same graph as PyTorch's FX `_ConvBnNd` and torchao's `prepare_qat_pt2e`). torchao builds that
graph, and folds it at conversion, by matching 96 pattern graphs that it exports one by one: 21 s for every
conversion on this 2-core CPU, and 2.6 s for every capture, whatever the model's size. The passes here make the
same graph by walking the conv -> BatchNorm edges directly (`fuse_bn_for_qat_`) and fold it at conversion the same
way (`fold_bn_`), in milliseconds; tests/pipeline/core/int8/test_pt2e.py checks the result against torchao's.

A γ of exactly zero (timm zero-initialises the last BatchNorm of residual blocks) makes γ/σ zero: the division
uses 1 there instead, which is exact, as the folded weights are zero and BatchNorm returns β whatever its input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from pipeline.core.int8.qdq_quantizer import IN_UNIT, UNIT_END

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
BATCH_NORM = aten.batch_norm.default
CONV_BIAS = "int8_conv_bias"  # node.meta of a fused conv: its own bias parameter, if any
BN_TRAINING_ARG = 5  # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)


def capture(model: nn.Module, input_size: tuple[int, ...]) -> GraphModule:
    """`model` captured by torch.export in eval mode with a dynamic batch dimension, as an fx GraphModule whose
    parameters and buffers are `model`'s own tensors. Eval mode: dropout and drop path keep their inference
    behaviour (inactive while quantization-aware training runs too), BatchNorm uses running statistics until
    `set_bn_training_` switches it."""
    training = model.training
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros(2, *input_size, device=_device(model))  # 2: a batch of 1 would be specialised
    try:
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    finally:
        model.train(training)
    return program.module()


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _constant(model: GraphModule, node: Node) -> torch.Tensor:
    """The parameter or buffer a get_attr node reads."""
    owner, _, leaf = node.target.rpartition(".")
    module = model.get_submodule(owner)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _insert(graph, target, args: tuple) -> Node:
    node = graph.call_function(target, args)
    node.meta[IN_UNIT] = True
    return node


def fuse_bn_for_qat_(model: GraphModule) -> int:
    """Rewrite every conv -> BatchNorm edge (the conv's only user) as quantization-aware training computes it:
    conv(x, w·s) / s (+ conv bias) -> BatchNorm, with s = γ / sqrt(running_var + eps) (see the module). The conv
    node records its BatchNorm in `meta[UNIT_END]`, so the quantizer quantizes the BatchNorm's output and
    `fold_bn_` finds it. Returns the number of folded pairs."""
    graph, fused = model.graph, 0
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target is not BATCH_NORM or bn.args[1] is None:
            continue
        conv = bn.args[0]
        if not (isinstance(conv, Node) and conv.target in CONVS and len(conv.users) == 1):
            continue
        weight, bias = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
        dims = _constant(model, weight).dim()
        with graph.inserting_before(conv):  # everything that does not depend on the conv's output
            std = _insert(graph, aten.sqrt.default, (_insert(graph, aten.add.Tensor, (bn.args[4], bn.args[7])),))
            scale = _insert(graph, aten.div.Tensor, (bn.args[1], std))
            safe = _insert(graph, aten.where.ScalarSelf, (_insert(graph, aten.eq.Scalar, (scale, 0.0)), 1.0, scale))
            per_output = _insert(graph, aten.reshape.default, (scale, [-1] + [1] * (dims - 1)))
            scaled = _insert(graph, aten.mul.Tensor, (weight, per_output))
            divisor = _insert(graph, aten.reshape.default, (safe, [1, -1] + [1] * (dims - 2)))
            shift = None if bias is None else _insert(graph, aten.reshape.default, (bias, [1, -1] + [1] * (dims - 2)))
        conv.args = (conv.args[0], scaled, None, *conv.args[3:])
        with graph.inserting_after(conv):
            out = _insert(graph, aten.div.Tensor, (conv, divisor))
        if shift is not None:
            with graph.inserting_after(out):
                out = _insert(graph, aten.add.Tensor, (out, shift))
        bn.args = (out, *bn.args[1:])
        conv.meta[UNIT_END] = bn.name
        conv.meta[CONV_BIAS] = bias.target if bias is not None else None
        fused += 1
    graph.lint()
    model.recompile()
    return fused


def set_bn_training_(model: GraphModule, training: bool) -> None:
    """BatchNorm nodes normalise with batch statistics and update their running statistics (`training`), or use the
    running statistics; a captured graph ignores `module.train()`, so the flag in each node is switched."""
    changed = False
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is BATCH_NORM and node.args[BN_TRAINING_ARG] != training:
            node.args = (*node.args[:BN_TRAINING_ARG], training, *node.args[BN_TRAINING_ARG + 1 :])
            changed = True
    if changed:
        model.recompile()


def fold_bn_(model: GraphModule) -> None:
    """Fold every BatchNorm `fuse_bn_for_qat_` kept into its convolution, with running statistics: the conv takes
    the folded weight w·s (where the weight's fake quantizer observed it) and bias (b - mean)·s + β, and the
    division and BatchNorm go. In place: call it on a copy of the trained model."""
    named = {n.name: n for n in model.graph.nodes}
    for conv in [n for n in model.graph.nodes if UNIT_END in n.meta]:
        bn = named[conv.meta[UNIT_END]]
        weight_node = _weight_parameter(conv)
        weight, bias = _constant(model, weight_node), conv.meta.get(CONV_BIAS)
        gamma, beta, mean, var = (_constant(model, a) for a in bn.args[1:5])
        scale = gamma / torch.sqrt(var + bn.args[7])
        shape = (-1,) + (1,) * (weight.dim() - 1)
        layer = model.get_submodule(weight_node.target.rpartition(".")[0])
        conv_bias = model.get_parameter(bias) if bias is not None else torch.zeros_like(mean)
        layer.register_buffer("folded_weight", (weight * scale.reshape(shape)).detach().clone())
        layer.register_buffer("folded_bias", ((conv_bias - mean) * scale + beta).detach().clone())
        prefix = weight_node.target.rpartition(".")[0]
        with model.graph.inserting_before(next(iter(model.graph.nodes))):  # constants first: the weight's
            folded_w = model.graph.get_attr(f"{prefix}.folded_weight")  # fake quantizer comes before the conv
            folded_b = model.graph.get_attr(f"{prefix}.folded_bias")
        _scaled_weight(conv).replace_all_uses_with(folded_w)
        conv.args = (conv.args[0], conv.args[1], folded_b, *conv.args[3:])
        bn.replace_all_uses_with(conv)
        del conv.meta[UNIT_END]
    model.graph.eliminate_dead_code()
    model.recompile()


def _scaled_weight(conv: Node) -> Node:
    """The w·s node feeding a fused conv (directly, or through the weight's fake quantizer)."""
    node = conv.args[1]
    return node if node.meta.get(IN_UNIT) else node.args[0]


def _weight_parameter(conv: Node) -> Node:
    mul = _scaled_weight(conv)
    return mul.args[0]


def drop_unused_attributes_(model: GraphModule) -> None:
    """Delete parameters and buffers no node reads (a converted graph keeps the float weights it replaced)."""
    used = {n.target for n in model.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in model.named_parameters(remove_duplicate=False)] + [
        n for n, _ in model.named_buffers(remove_duplicate=False)
    ]:
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)


def standalone_bn_as_affine_(model: GraphModule) -> int:
    """Every BatchNorm no convolution absorbed, in eval mode, as its per-channel affine map x·a + c (a = γ/σ,
    c = β - mean·a), so conversion sees no BatchNorm (torchao would search its QAT patterns for one: 21 s).
    In place, on a copy; returns how many."""
    count = 0
    for bn in [n for n in model.graph.nodes if n.op == "call_function" and n.target is BATCH_NORM]:
        x, weight, bias, mean, var = bn.args[:5]
        mean_t, var_t = _constant(model, mean), _constant(model, var)
        scale = (_constant(model, weight) if weight is not None else torch.ones_like(mean_t)) / torch.sqrt(
            var_t + bn.args[7]
        )
        shift = (_constant(model, bias) if bias is not None else torch.zeros_like(mean_t)) - mean_t * scale
        rank = x.meta["val"].dim() if "val" in x.meta else 4
        shape = [1, -1] + [1] * (rank - 2)
        owner = model.get_submodule(mean.target.rpartition(".")[0])
        owner.register_buffer("affine_scale", scale.reshape(shape).detach().clone())
        owner.register_buffer("affine_shift", shift.reshape(shape).detach().clone())
        prefix = mean.target.rpartition(".")[0]
        with model.graph.inserting_before(bn):
            a = model.graph.get_attr(f"{prefix}.affine_scale")
            c = model.graph.get_attr(f"{prefix}.affine_shift")
            out = model.graph.call_function(aten.add.Tensor, (model.graph.call_function(aten.mul.Tensor, (x, a)), c))
        bn.replace_all_uses_with(out)
        model.graph.erase_node(bn)
        count += 1
    model.graph.eliminate_dead_code()
    model.recompile()
    return count
