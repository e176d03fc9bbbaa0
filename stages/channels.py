"""Structured pruning's channel surgery, shared by the prune stage and per-layer sensitivity: the importance
criteria, the classifier that keeps its outputs, and pruning one torch-pruning group (or one layer's output
channels) while the weights earlier stages fixed follow the removed channels."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from pipeline.core.fixed_weights import FixedWeights

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

IMPORTANCES = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first"),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2, group_reduction="first"),
    "group_norm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}


def kept_channels(channels: int, kept: int, multiple: int | None) -> int:
    """How many of a layer's `channels` to keep when `kept` is asked for and counts are rounded to `multiple`: the
    nearest multiple, at least one multiple and at most every channel (a layer narrower than `multiple` keeps all)."""
    if not multiple or multiple <= 1:
        return kept
    if channels <= multiple:
        return channels
    return min(max(multiple, multiple * round(kept / multiple)), channels)


class RoundingPruner(tp.pruner.BasePruner):
    """torch-pruning's pruner, with the channels a layer keeps rounded to the *nearest* multiple of `round_to` (at
    least one multiple; a layer narrower than one keeps its width): torch-pruning rounds down, which removes every
    channel of a layer that would keep fewer than `round_to`."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        return current_channels - kept_channels(current_channels, current_channels - n_pruned, round_to)


def classifier(model: nn.Module) -> nn.Module:
    """The output layer, which must keep one output per class: timm's `get_classifier()`, else the last Linear."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no classifier layer found to protect from structured pruning")
    return linears[-1]


def out_channels_fn(layer: nn.Module):
    """torch-pruning's function that removes a layer's output channels."""
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def out_pruned(group, graph: tp.DependencyGraph) -> set[nn.Module]:
    """The modules whose output channels `group` removes (the channels coupled to its root's go too)."""
    return {dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)}


def prune_group_(group, graph: tp.DependencyGraph, names: dict[nn.Module, str], fixed: FixedWeights) -> None:
    """Remove `group`'s channels from the model; the fixed (frozen, pruned) entries of its layers go with them."""
    removals = [(dep.target.module, graph.is_out_channel_pruning_fn(dep.handler), idxs) for dep, idxs in group]
    dims = [(names.get(m), weight_dim(m, is_out)) for m, is_out, _ in removals]
    sizes = [m.weight.shape[d] if d is not None and hasattr(m, "weight") else None for m, (_, d) in
             zip((r[0] for r in removals), dims, strict=True)]  # fmt: skip
    group.prune()
    for (name, dim), size, (_, _, idxs) in zip(dims, sizes, removals, strict=True):
        follow_fixed(fixed, name, dim, size, idxs)


def prune_layers_channels_(
    model: nn.Module,
    ratios: dict[str, float],
    importance: str,
    input_size: tuple[int, ...],
    fixed: FixedWeights | None = None,
    round_to: int | None = None,
) -> dict[str, tuple[str, ...]]:
    """Remove `ratio` of each named layer's output channels (the least important by `importance`, at least one kept;
    the count kept rounded as `kept_channels` says) with the channels coupled to them, layers in the given order over
    one dependency graph; returns, per layer, the other layers whose output channels went too."""
    model.eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_size))
    names = {m: n for n, m in model.named_modules()}
    fixed = fixed if fixed is not None else FixedWeights()
    coupled = {}
    for name, ratio in ratios.items():
        layer = model.get_submodule(name)
        fn = out_channels_fn(layer)
        channels = layer.weight.shape[0]
        scores = IMPORTANCES[importance]()(graph.get_pruning_group(layer, fn, idxs=list(range(channels))))
        count = channels - kept_channels(channels, channels - min(int(ratio * channels), channels - 1), round_to)
        group = graph.get_pruning_group(layer, fn, idxs=sorted(torch.argsort(scores)[:count].tolist()))
        reached = {names.get(m) for m in out_pruned(group, graph) if isinstance(m, PRUNABLE)}
        coupled[name] = tuple(sorted(reached - {name, None}))
        if count:
            prune_group_(group, graph, names, fixed)
    return coupled


def prune_layer_channels_(
    model: nn.Module, name: str, ratio: float, importance: str, input_size: tuple[int, ...]
) -> tuple[str, ...]:
    """`prune_layers_channels_` of one layer: the other layers whose output channels went too."""
    return prune_layers_channels_(model, {name: ratio}, importance, input_size)[name]


def weight_dim(module: nn.Module, is_out: bool) -> int | None:
    """The weight dimension a channel removal cuts: out-channels dim 0, in-channels dim 1 (depthwise: 0)."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed):
        if is_out or getattr(module, "groups", 1) > 1:
            return 0
        return 1
    return 0 if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1 else None


def follow_fixed(fixed: FixedWeights, name: str | None, dim: int | None, size: int | None, idxs) -> None:
    """Removed channels take their fixed (frozen, pruned) entries with them."""
    if name is None:
        return
    weight = f"{name}.weight" if name else "weight"
    if weight not in fixed:
        return
    if dim is None or size is None:
        raise NotImplementedError(f"{name}: cannot carry frozen weights through structured pruning of this layer")
    removed = {int(getattr(i, "idx", i)) for i in idxs}
    keep = torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)
    fixed.index_select_(weight, dim, keep)


# --- the stage's pruner -----------------------------------------------------------------------------------


def step_ratio(final_ratio: float, step: int, steps: int) -> float:
    """The pruning ratio reached after `step` (1-based) of `steps` equal steps."""
    return final_ratio * step / steps


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention blocks: a fused `qkv` Linear and `num_heads`."""
    return [m for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")]


def sync_attention_(model: nn.Module, pruner) -> None:
    """timm attention reshapes with num_heads / head_dim: keep them true to the pruned weights."""
    for attn in attention_modules(model):
        attn.num_heads = pruner.num_heads[attn.qkv]
        attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = attn.num_heads * attn.head_dim


def _schedule(final_ratio: float, steps: int) -> list[float]:
    """torch-pruning's scheduler protocol: the ratio after each of steps 0..steps, from `step_ratio`."""
    return [step_ratio(final_ratio, step, steps) for step in range(steps + 1)]


def make_pruner(model: nn.Module, config, input_size: tuple[int, ...]) -> tp.pruner.BasePruner:
    """The stage's torch-pruning pruner for `model` from a PruneConfig (criterion, scope, ratio, steps, rounding)."""
    model.cpu().eval()
    example = torch.zeros(2, *input_size)
    ignored = [classifier(model)]
    try:
        return RoundingPruner(
            model, example, importance=IMPORTANCES[config.importance](), global_pruning=config.scope == "global",
            pruning_ratio=config.pruning_ratio, max_pruning_ratio=config.max_layer_ratio,
            iterative_steps=config.iterative_steps, ignored_layers=ignored, round_to=config.channel_multiple(),
            iterative_pruning_ratio_scheduler=_schedule,
            num_heads={m.qkv: m.num_heads for m in attention_modules(model)},
            prune_num_heads=config.prune_heads, prune_head_dims=not config.prune_heads,
            head_pruning_ratio=config.pruning_ratio if config.prune_heads else 0.0,
        )  # fmt: skip
    except Exception as err:
        raise RuntimeError(
            f"torch-pruning could not trace {type(model).__name__} for structured pruning: {err}"
        ) from err
