"""The `lowrank` stage: low-rank factorisation of convolution and linear weights by truncated SVD, then
fine-tuning (Denton et al. 2014; Jaderberg et al. 2014 use the same spatial-then-1x1 split).

A k×k convolution with weight W (out, in, k, k) is reshaped to the matrix M (out, in·k·k) and
replaced by its best rank-r approximation M ≈ B·A (Eckart–Young): a k×k convolution with r output
channels (A, same stride, padding and dilation) followed by a 1×1 convolution back to `out`
channels (B, the original bias). A linear layer becomes two linear layers the same way. The layer's
weights shrink from out·in·k² to r·(in·k² + out), and so do its multiply-accumulates.

What / how / when: the rank rule (what: a share of the full rank or of the spectrum's energy), the
factorisation (how: `factorise`, pure), and one fine-tuning run after all layers are replaced.

The stage is one file: it registers its structural change (`lowrank`), which rebuilds the
factorised modules from a fresh timm model when an artifact loads, and the weight formats of
other stages (sparse, INQ-packed, int8) then apply to the factors like to any other layer.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import OrderedDict
from typing import Any, Literal

import timm
import torch
from pydantic import Field, field_validator
from torch import nn

from pipeline.core.metrics import count_macs, count_params
from pipeline.core.models import ModelState
from pipeline.core.structure import StructuralChange, register_structural_change
from pipeline.core.training import TrainConfig
from stages.base import StageContext, StageOutput, register_stage

log = logging.getLogger("pipeline")

FACTORISABLE = (nn.Conv1d, nn.Conv2d, nn.Linear, timm.layers.Linear)
"""Exact module types factorised: subclasses with their own forward (same-padding, weight standardisation) are not."""


class LowRankConfig(TrainConfig):
    """Which layers are factorised and at which rank; the inherited training fields configure the fine-tuning."""

    keep: float = Field(
        0.25,
        gt=0,
        le=1,
        description="rank kept per layer: a fraction of its full rank min(out, in·k·k) (rank_by: rank), or the "
        "fraction of its squared singular values the kept ones must hold (rank_by: energy)",
    )
    rank_by: Literal["rank", "energy"] = Field("rank", description="how `keep` chooses each layer's rank")
    min_param_reduction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="a layer is factorised only if its weights shrink by at least this fraction at the chosen rank",
    )
    include_classifier: bool = Field(False, description="factorise the output layer too")
    skip: tuple[str, ...] = Field(
        (), description="module names (fnmatch patterns, e.g. 'stem.*') that stay as they are"
    )
    # Fine-tuning defaults suit a trained input model.
    epochs: int = Field(2, ge=0, le=10_000, description="fine-tuning epochs after the factorisation")
    lr: float = Field(0.01, gt=0, le=10, description="peak fine-tuning learning rate")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("cosine", description="per-step LR schedule")

    @field_validator("skip")
    @classmethod
    def _patterns(cls, skip: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in skip):
            raise ValueError("module name patterns must not be empty")
        return skip


# --- what: the rank rule --------------------------------------------------------------------------


def choose_rank(singular_values: torch.Tensor, keep: float, rank_by: str) -> int:
    """The rank kept for a layer with these singular values (descending): at least 1."""
    full = singular_values.numel()
    if rank_by == "rank":
        return max(1, math.ceil(keep * full))
    energy = torch.cumsum(singular_values.double() ** 2, 0)
    return max(1, int(torch.searchsorted(energy, keep * energy[-1], right=False)) + 1)


def factorised_params(weight_shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """Weights of the two factors of a layer with this weight shape, at `rank`."""
    out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
    return rank * (fan_in + out)


# --- how: the factorisation and the factorised module ---------------------------------------------


def factorise(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the best rank-`rank` approximation of `weight` reshaped to (out, in·k·k).

    A has shape (rank, *weight.shape[1:]), B (out, rank); the singular values are split evenly
    (√S on each side) so both factors have comparable scale for fine-tuning.
    """
    return _truncate(weight, _svd(weight), rank)


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of `weight` reshaped to (out, in·k·k), in float64."""
    return torch.linalg.svd(weight.detach().double().flatten(1), full_matrices=False)


def _truncate(weight: torch.Tensor, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int):
    """`factorise`'s (A, B) from an SVD of `weight` already computed."""
    u, s, vh = svd
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).reshape(rank, *weight.shape[1:])
    b = u[:, :rank] * root[None, :]
    return a.to(weight.dtype), b.to(weight.dtype)


def lowrank_module(layer: nn.Module, rank: int) -> nn.Sequential:
    """The two-layer replacement of `layer` at `rank` (placeholder weights): `reduce`, then `expand`."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        reduce = nn.Linear(layer.in_features, rank, bias=False)
        expand = nn.Linear(rank, layer.out_features, bias=bias)
    else:
        conv = type(layer)
        reduce = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                      dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)  # fmt: skip
        expand = conv(rank, layer.out_channels, 1, bias=bias)
    return nn.Sequential(OrderedDict(reduce=reduce, expand=expand)).train(layer.training)


def _replace_(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


@register_structural_change("lowrank")
def _replay_lowrank(model: nn.Module, args: dict[str, Any]) -> nn.Module:
    """Each recorded layer replaced by its factorised pair at the recorded rank."""
    for name, rank in args["ranks"].items():
        _replace_(model, name, lowrank_module(model.get_submodule(name), int(rank)))
    return model


# --- the stage ------------------------------------------------------------------------------------


def _candidates(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """Layers that may be factorised: plain conv/linear, ungrouped, not skipped, not the classifier unless asked."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    found = {}
    for name, module in model.named_modules():
        if type(module) not in FACTORISABLE or getattr(module, "groups", 1) != 1 or not name:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            continue
        if module is head and not config.include_classifier:
            continue
        found[name] = module
    return found


def _plan_ranks(model: nn.Module, config: LowRankConfig) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """Per layer worth factorising: (rank, A, B)."""
    plan = {}
    for name, layer in _candidates(model, config).items():
        weight = layer.weight.detach().cpu()
        svd = _svd(weight)  # once per layer: its singular values choose the rank, its vectors give the factors
        rank = choose_rank(svd[1], config.keep, config.rank_by)
        if factorised_params(weight.shape, rank) <= (1 - config.min_param_reduction) * weight.numel():
            plan[name] = (rank, *_truncate(weight, svd, rank))
    return plan


def _install_(state: ModelState, plan: dict[str, tuple[int, torch.Tensor, torch.Tensor]]) -> None:
    """Replace each planned layer by its factors (SVD values), releasing the fixed weights of the replaced layers."""
    model = state.model
    for name, (rank, a, b) in plan.items():
        layer = model.get_submodule(name)
        pair = lowrank_module(layer, rank).to(layer.weight.device)
        with torch.no_grad():
            pair.reduce.weight.copy_(a)
            pair.expand.weight.copy_(b.reshape(pair.expand.weight.shape))
            if layer.bias is not None:
                pair.expand.bias.copy_(layer.bias)
        _replace_(model, name, pair)
        dropped = [key for key in (f"{name}.weight", f"{name}.bias") if key in state.fixed]
        if dropped:  # the factors are new weights: an earlier stage's zeros in the replaced ones do not carry over
            log.info("lowrank: %s: the fixed entries of %s are replaced by dense factors", name, ", ".join(dropped))
            state.fixed.drop_(dropped)


# After INQ every weight is a frozen power of two: factors would undo it. qat allows only training stages after it.
@register_stage("lowrank", config=LowRankConfig, lowers={"bytes", "compute"}, not_after={"inq"}, renames_layers=True)
def run_lowrank(state: ModelState | None, config: LowRankConfig, ctx: StageContext) -> StageOutput:
    """Factorise conv and linear weights by truncated SVD into two thinner layers, then fine-tune."""
    if state is None:
        raise ValueError("lowrank needs a trained input model; it cannot be the first stage")
    input_size = ctx.data.input_size
    params_before, macs_before = count_params(state.model), count_macs(state.model.cpu().eval(), input_size)
    plan = _plan_ranks(state.model, config)
    if not plan:
        raise RuntimeError(
            f"lowrank: no layer of {type(state.model).__name__} shrinks by {config.min_param_reduction:.0%} at "
            f"keep={config.keep} ({config.rank_by}); raise keep's reduction (a smaller keep) or lower "
            "min_param_reduction"
        )
    _install_(state, plan)
    state.structure.append(StructuralChange("lowrank", {"ranks": {name: rank for name, (rank, _, _) in plan.items()}}))
    report = ctx.fit(state, config, desc="lowrank finetune")
    full_ranks = [min(b.shape[0], math.prod(a.shape[1:])) for _, a, b in plan.values()]
    metrics = {
        "params_before": float(params_before),
        "params_after": float(count_params(state.model)),
        "macs_before": float(macs_before),
        "macs_after": float(count_macs(state.model.cpu().eval(), input_size)),
        "lowrank_layers": float(len(plan)),
        "lowrank_mean_rank_fraction": sum(r / f for (r, _, _), f in zip(plan.values(), full_ranks, strict=True))
        / len(plan),
    }
    return StageOutput(state, metrics=metrics, report=report)
