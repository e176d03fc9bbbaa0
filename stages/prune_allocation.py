"""`prune: {allocation: sensitivity}`: per-layer pruning ratios chosen from measured sensitivity, instead of one ratio
in every layer.

1. **Groups.** Layers whose output channels torch-pruning removes together (a residual stream's convolutions) form
   one group; the first in model order stands for it. The classifier keeps its outputs.
2. **Sensitivity.** For every group and every candidate ratio (`CANDIDATES`, up to `max_layer_ratio`): the validation
   top-1 of the model with only that group pruned, without fine-tuning, on `allocation_images` validation images
   (a fixed random subset), and the MACs (or parameters) it saves.
3. **Allocation.** Greedy on the marginal predicted drop per unit saved: from no pruning, raise the group whose next
   candidate costs the least top-1 per MAC (parameter) saved, until the model with every chosen ratio applied, counted
   for real, has removed at least `pruning_ratio` of its MACs (parameters). Savings are counted on the whole model
   because pruning two groups saves less than the sum of each alone (a layer losing input and output channels).
4. **Prediction.** The chosen ratios' drops summed (additive sensitivity) are recorded next to the drop measured on the
   allocated model before fine-tuning, so a user sees how far the additive prediction holds.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.metrics import count_macs, count_params, predictions
from stages.allocation import allocate
from stages.channels import (
    PRUNABLE,
    classifier,
    out_channels_fn,
    out_pruned,
    prune_layers_channels_,
)

log = logging.getLogger("pipeline")

CANDIDATES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
"""The ratios tried per group (those above the stage's max_layer_ratio are left out)."""


@dataclass
class Allocation:
    ratios: dict[str, float]  # group (its first layer) -> share of its output channels removed
    predicted_drop: float  # sum of the chosen ratios' drops, each measured alone
    measured_drop: float  # the allocated model's drop before fine-tuning, on the same images
    removed_share: float  # of the model's MACs (or parameters), counted after pruning
    evaluations: int

    def metrics(self) -> dict[str, float]:
        out = {
            "allocation_predicted_drop": self.predicted_drop,
            "allocation_measured_drop": self.measured_drop,
            "allocation_removed_share": self.removed_share,
            "allocation_evaluations": float(self.evaluations),
        }
        return out | {f"allocation_ratio.{name}": ratio for name, ratio in self.ratios.items()}


def group_roots(model: nn.Module, input_size: tuple[int, ...]) -> list[str]:
    """One layer per group of coupled output channels, in model order (the classifier's group left out)."""
    graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=torch.zeros(1, *input_size))
    names = {m: n for n, m in model.named_modules()}
    head, seen, roots = classifier(model), set(), []
    for name, layer in model.named_modules():
        if not isinstance(layer, PRUNABLE) or layer is head or name in seen:
            continue
        members = out_pruned(graph.get_pruning_group(layer, out_channels_fn(layer), idxs=[0]), graph)
        if head in members:
            continue
        seen |= {names[m] for m in members if m in names}
        roots.append(name)
    return roots


def sensitivity_prune_(
    model: nn.Module,
    fixed: FixedWeights,
    *,
    share: float,
    target: str,
    importance: str,
    max_ratio: float,
    loader,
    input_size: tuple[int, ...],
    round_to: int | None = None,
) -> Allocation:
    """Measure, allocate, and prune `model` in place so that `share` of its `target` (macs | params) is removed, every
    pruned layer keeping a multiple of `round_to` channels (`stages.channels.kept_channels`)."""
    size = (lambda m: count_macs(m, input_size)) if target == "macs" else count_params
    base_size, base_top1 = size(model), predictions(model.eval(), loader).top1
    roots = group_roots(model, input_size)
    candidates = [r for r in CANDIDATES if r <= max_ratio]
    drops: dict[str, dict[float, float]] = {g: {} for g in roots}
    saved: dict[str, dict[float, float]] = {g: {} for g in roots}
    for g in roots:
        for r in candidates:
            pruned = copy.deepcopy(model)
            prune_layers_channels_(pruned, {g: r}, importance, input_size, round_to=round_to)
            drops[g][r] = base_top1 - predictions(pruned, loader).top1
            saved[g][r] = base_size - size(pruned)
    log.info("prune: sensitivity of %d layer groups x %d ratios measured", len(roots), len(candidates))

    def pruned_size(ratios: dict[str, float]) -> float:
        pruned = copy.deepcopy(model)
        prune_layers_channels_(pruned, ratios, importance, input_size, round_to=round_to)
        return size(pruned)

    try:
        ratios = allocate(drops, saved, pruned_size, base_size * (1 - share), base_size)
    except ValueError:
        raise ValueError(
            f"prune: every layer group is at its largest allowed ratio (max_layer_ratio {max_ratio:g}) "
            f"and {share:.0%} of the {target} are not removed yet"
        ) from None
    # the same removals on the model itself, its fixed weights following
    prune_layers_channels_(model, ratios, importance, input_size, fixed=fixed, round_to=round_to)
    return Allocation(
        ratios=ratios,
        predicted_drop=sum(drops[g][r] for g, r in ratios.items()),
        measured_drop=base_top1 - predictions(model.eval(), loader).top1,
        removed_share=1 - size(model) / base_size,
        evaluations=len(roots) * len(candidates) + 2,
    )
