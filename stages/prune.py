"""The `prune` stage: structured pruning that physically removes channels (torch-pruning), or
unstructured magnitude pruning whose zeros later stages keep and whose artifact stores fewer bytes.

What / how / when are kept apart: the importance criterion (what) comes from torch-pruning's
`importance` module or weight magnitude; the surgery (how) is torch-pruning's dependency graph or a
fixed-at-zero mask; the schedule (when) is a pure function of the step (`step_ratio`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_serializer, model_validator
from torch import nn

from pipeline.core.metrics import count_macs, count_params
from pipeline.core.models import ModelState
from pipeline.core.structure import StructuralChange, layout, register_structural_change, resize_, resize_args
from pipeline.core.training import TrainConfig, TrainReport
from stages.base import StageContext, StageOutput, register_stage
from stages.channels import (
    PRUNABLE,
    attention_modules,
    classifier,
    make_pruner,
    prune_group_,
    step_ratio,
    sync_attention_,
)
from stages.prune_allocation import sensitivity_prune_
from stages.sparsity import magnitude_masks

log = logging.getLogger("pipeline")

DEFAULT_CHANNEL_MULTIPLE = 8
"""`round_to: auto` in a config that did not come from a recipe: what the built-in runtimes declare."""


class PruneConfig(TrainConfig):
    """Pruning settings; the inherited training fields configure the fine-tuning."""

    method: Literal["structured", "unstructured"] = Field(
        "structured", description="structured: remove whole channels/heads; unstructured: zero single weights"
    )
    pruning_ratio: float = Field(
        0.5, ge=0, lt=1, description="fraction of channels (structured) or weights (unstructured) removed"
    )
    importance: Literal["l1", "l2", "group_norm", "bn_scale", "taylor", "random"] = Field(
        "group_norm", description="structured criterion: filter L1/L2 norm, group norm, BN scale, Taylor, random"
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: the same ratio in every layer; global: rank channels/weights across layers"
    )
    max_layer_ratio: float = Field(
        0.9, gt=0, le=1, description="structured global scope: the largest fraction of channels one layer may lose"
    )
    prune_heads: bool = Field(
        False, description="attention models: remove whole heads (pruning_ratio of them) instead of head dims"
    )
    iterative_steps: int = Field(1, ge=1, le=100, description="reach pruning_ratio in this many equal steps")
    finetune: Literal["each_step", "end"] = Field(
        "each_step", description="fine-tune `epochs` after every step, or once after the last step"
    )
    round_to: int | Literal["auto"] | None = Field(
        "auto",
        description="keep every pruned layer's channel count a multiple of this (the nearest, at least one multiple): "
        "auto = what the recipe's deploy runtimes' CPU kernels block channels by (8 for ONNX Runtime and OpenVINO); "
        "null: exact ratios, whatever counts they give",
    )
    taylor_batches: int = Field(8, ge=1, le=1000, description="batches of gradients for the taylor criterion")
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform",
        description="uniform: pruning_ratio in every layer (or by `scope`); sensitivity: per-layer ratios from "
        "measured sensitivity that remove pruning_ratio of the model's `target` at the smallest predicted drop",
    )
    target: Literal["channels", "macs", "params"] | None = Field(
        None,
        description="what pruning_ratio is a share of: channels (of every layer; uniform's default), macs or params "
        "(of the model; sensitivity's default macs). Uniform with macs or params finds the one channel ratio of every "
        "layer that removes that share, counted after rounding",
    )
    allocation_images: int = Field(
        1000, ge=100, le=1_000_000, description="allocation sensitivity: validation images each candidate is scored on"
    )
    # Fine-tuning defaults suit a trained input model.
    lr: float = Field(0.02, gt=0, le=10, description="peak fine-tuning learning rate")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("cosine", description="per-step LR schedule")

    def total_epochs(self) -> int:
        return self.epochs * (self.iterative_steps if self.finetune == "each_step" else 1)

    def with_total_epochs(self, epochs: int) -> PruneConfig:
        steps = self.iterative_steps if self.finetune == "each_step" else 1
        per_step = max(1, round(epochs / steps)) if epochs else 0
        return type(self).model_validate({**self.model_dump(), "epochs": per_step})

    @model_validator(mode="after")
    def _structured_only_options(self) -> PruneConfig:
        if self.method == "unstructured" and self.importance not in {"group_norm", "l1", "l2"}:
            raise ValueError(f"importance {self.importance!r} is for structured pruning; unstructured uses magnitude")
        if self.allocation == "sensitivity":
            unsupported = {
                "method: unstructured": self.method == "unstructured",
                "iterative_steps > 1": self.iterative_steps > 1,
                "scope: global": self.scope == "global",
                "prune_heads": self.prune_heads,
                "importance: taylor": self.importance == "taylor",
            }
            given = [k for k, v in unsupported.items() if v]
            if given:
                raise ValueError(f"allocation: sensitivity with {', '.join(given)} is not yet supported")
            if self.target == "channels":
                raise ValueError("allocation: sensitivity removes a share of the model's macs or params, not channels")
        if self.method == "unstructured" and self.share_of != "channels":
            raise ValueError("target: unstructured pruning zeroes a share of the weights; macs and params need "
                             "method: structured")  # fmt: skip
        return self

    @field_validator("round_to")
    @classmethod
    def _positive_multiple(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError(f"must be auto, null or 1..256 channels, got {value}")
        return value

    def with_channel_multiple(self, multiple: int) -> PruneConfig:
        """This config with `round_to: auto` resolved to `multiple` (the recipe's runtimes', when it loads)."""
        if self.round_to != "auto":
            return self
        return type(self).model_validate({**self.model_dump(), "round_to": multiple})

    def channel_multiple(self) -> int | None:
        """The multiple channel counts are rounded to (auto outside a recipe: the built-in runtimes' 8)."""
        if self.round_to == "auto":
            return DEFAULT_CHANNEL_MULTIPLE
        return None if self.round_to in (None, 1) else self.round_to

    @property
    def share_of(self) -> str:
        """What pruning_ratio is a share of: `target`, or the allocation's default."""
        return self.target or ("macs" if self.allocation == "sensitivity" else "channels")

    @model_serializer(mode="wrap")
    def _allocation_only_when_used(self, handler) -> dict[str, Any]:
        """The allocation fields are left out while allocation is uniform (and target while it is channels), so recipes
        written before they existed keep their cache keys."""
        data = handler(self)
        if self.allocation == "uniform":
            for key in ("allocation", "allocation_images"):
                data.pop(key, None)
        if self.share_of == "channels":
            data.pop("target", None)
        else:
            data["target"] = self.share_of
        return data


def _lowers(config: PruneConfig) -> frozenset[str]:
    """Removing channels shrinks the model and its compute; masked weights shrink only the stored (sparse) bytes."""
    return frozenset({"bytes", "compute"} if config.method == "structured" else {"bytes"})


def dry_run(model: nn.Module, config: PruneConfig, input_size: tuple[int, ...]) -> str | None:
    """Why structured pruning cannot run on `model` (a fresh build), found by running one pruning step on it (no data,
    no fine-tuning) when the recipe loads; None when it can. torch-pruning's dependency graph fails on some
    architectures (hybrid attention blocks whose channels it cannot match up): refused before any training."""
    if config.method != "structured":
        return None
    try:
        if config.allocation == "sensitivity":
            from stages.channels import prune_layers_channels_
            from stages.prune_allocation import group_roots

            roots = group_roots(model, input_size)
            prune_layers_channels_(model, dict.fromkeys(roots[:2], 0.5), "group_norm", input_size)
        else:
            if config.importance == "taylor":  # its gradients, from one random batch
                nn.functional.cross_entropy(
                    model(torch.randn(2, *input_size)), torch.zeros(2, dtype=torch.long)
                ).backward()
            pruner = make_pruner(model, config.model_copy(update={"iterative_steps": 1}), input_size)
            for group in pruner.step(interactive=True):
                group.prune()
            sync_attention_(model, pruner)
        _check_forward(model, input_size)
    except Exception as err:  # any failure of torch-pruning on this model: the reason to refuse it
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"structured pruning cannot handle {type(model).__name__} (a trial step on the model failed: "
                f"{type(err).__name__}: {first[:200]}); use method: unstructured, or lowrank to shrink it")  # fmt: skip
    return None


# version 2: channel counts rounded to the nearest multiple of round_to (auto: the runtimes'), under allocation too
@register_stage(
    "prune", config=PruneConfig, lowers=_lowers, variant=lambda config: config.method, version=2, check=dry_run
)
def run_prune(state: ModelState | None, config: PruneConfig, ctx: StageContext) -> StageOutput:
    """Prune channels (structured, model gets smaller) or weights (unstructured, masks kept), fine-tuning between."""
    if state is None:
        raise ValueError("prune needs a trained input model; it cannot be the first stage")
    wrapper = state.wrapper
    if wrapper is not None:  # e.g. after qat: prune the float weights under the fake quantization, then wrap again
        wrapper.unwrap_(state)
    before = _size_metrics(state.model, ctx.data.input_size)
    widths, layout_before = _layer_widths(state.model), layout(state.model)
    prune_step = _structured_step if config.method == "structured" else _unstructured_step
    allocated = config.allocation == "sensitivity"
    structured = config.method == "structured" and not allocated
    report, allocation = TrainReport(), {}
    if structured and config.share_of != "channels":
        config, allocation = _uniform_ratio_for_share(state.model, config, ctx.data.input_size)
    pruner = make_pruner(state.model, config, ctx.data.input_size) if structured else None
    for step in range(1, config.iterative_steps + 1):
        if allocated:
            allocation = _allocated_step(state, config, ctx)
        else:
            prune_step(state, config, ctx, step, pruner)
        if step == config.iterative_steps:
            _record_result(state, config, widths, layout_before)
            if wrapper is not None:  # the last fine-tuning is on the wrapped model (quantization-aware after qat)
                wrapper.rewrap_(state, ctx, training=config.epochs > 0)
        if config.finetune == "each_step" or step == config.iterative_steps:
            report.extend(ctx.fit(state, config, desc=f"prune finetune {step}", step=step, epoch_offset=report.epochs))
    float_model = state.wrapper.float_model(state) if state.wrapper else state.model  # the flop counter needs float
    after = _size_metrics(float_model, ctx.data.input_size)
    metrics = {
        "params_before": before["params"],
        "params_after": after["params"],
        "macs_before": before["macs"],
        "macs_after": after["macs"],
        "weight_sparsity_before": before["sparsity"],
        "weight_sparsity": after["sparsity"],
        **allocation,
    }
    return StageOutput(state, metrics=metrics, report=report)


def _uniform_ratio_for_share(
    model: nn.Module, config: PruneConfig, input_size: tuple[int, ...]
) -> tuple[PruneConfig, dict[str, float]]:
    """The channel ratio of every layer that removes `pruning_ratio` of the model's MACs (parameters), counted on
    trial prunes of a copy with the stage's own pruner and rounding (bisection: the smallest ratio that reaches the
    share); the config with that ratio, and its metrics."""
    size = (lambda m: count_macs(m, input_size)) if config.share_of == "macs" else count_params
    base = size(model.cpu().eval())

    def removed(ratio: float) -> float:
        trial = copy.deepcopy(model)
        pruner = make_pruner(
            trial, config.model_copy(update={"pruning_ratio": ratio, "iterative_steps": 1}), input_size
        )
        for group in pruner.step(interactive=True):
            group.prune()
        sync_attention_(trial, pruner)
        return 1 - size(trial) / base

    low, high = 0.0, config.max_layer_ratio
    if removed(high) < config.pruning_ratio:
        raise ValueError(f"prune: {config.pruning_ratio:.0%} of the {config.share_of} is out of reach with at most "
                         f"{high:.0%} of every layer's channels (max_layer_ratio)")  # fmt: skip
    for _ in range(10):  # 0.1 % of the ratio range
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) < config.pruning_ratio else (low, middle)
    share = removed(high)
    log.info("prune: %.0f%% of the %s is a channel ratio of %.3f in every layer (removes %.1f%%, counted after "
             "rounding)", 100 * config.pruning_ratio, config.share_of, high, 100 * share)  # fmt: skip
    resolved = config.model_copy(update={"pruning_ratio": high, "target": "channels"})
    return resolved, {"uniform_channel_ratio": high, "uniform_removed_share": share}


def _allocated_step(state: ModelState, config: PruneConfig, ctx: StageContext) -> dict[str, float]:
    """Per-layer ratios from sensitivity measured on part of the validation split (stages/prune_allocation.py)."""
    data = ctx.data.with_val_subset(config.allocation_images)
    if any(True for _ in attention_modules(state.model)):
        raise ValueError("prune: allocation: sensitivity on attention models is not yet supported")
    done = sensitivity_prune_(
        state.model.cpu(), state.fixed, share=config.pruning_ratio, target=config.share_of,
        importance=config.importance, max_ratio=config.max_layer_ratio, loader=data.eval_loader("val"),
        input_size=ctx.data.input_size, round_to=config.channel_multiple(),
    )  # fmt: skip
    _check_forward(state.model, ctx.data.input_size)
    log.info("prune: allocated %s; removed %.1f%% of the %s; predicted drop %.2f points, measured %.2f before "
             "fine-tuning", ", ".join(f"{g} {r:.0%}" for g, r in done.ratios.items()), 100 * done.removed_share,
             "MACs" if config.share_of == "macs" else "parameters", done.predicted_drop,
             done.measured_drop)  # fmt: skip
    return done.metrics()


def _record_result(state: ModelState, config: PruneConfig, widths: dict[str, int], layout_before) -> None:
    """Check that pruning did what was asked and record it: sparse weights' format, or the smaller structure."""
    if config.method == "unstructured":
        state.artifact_format = "sparse" if state.artifact_format == "dense" else state.artifact_format
        _check_sparsity(state.model, config)
    else:
        _check_shrunk(state.model, widths, config)
        state.structure.append(StructuralChange("prune_channels", resize_args(layout_before, state.model)))


def _layer_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def _check_shrunk(model: nn.Module, widths: dict[str, int], config: PruneConfig) -> None:
    """Structured pruning that removed nothing is an error, not a silent no-op; full-width layers are named."""
    if config.pruning_ratio == 0:
        return
    now = _layer_widths(model)
    kept = [n for n, w in widths.items() if now.get(n) == w and model.get_submodule(n) is not classifier(model)]
    if len(kept) == len(widths) - 1:
        raise RuntimeError(
            f"structured pruning ({config.importance}) removed no channel from {type(model).__name__}; "
            "the criterion may not apply to this model (bn_scale needs BatchNorm layers)"
        )
    if kept:
        log.info("prune: layers left at full width (coupled to protected layers): %s", ", ".join(kept[:10]))


def _check_sparsity(model: nn.Module, config: PruneConfig) -> None:
    reached = weight_sparsity(model)
    if reached < config.pruning_ratio - 0.01:
        raise RuntimeError(
            f"unstructured pruning reached {reached:.1%} sparsity, not {config.pruning_ratio:.1%}: "
            "the remaining weights are frozen by an earlier stage (INQ) and cannot be pruned"
        )


def _size_metrics(model: nn.Module, input_size) -> dict[str, float]:
    return {
        "params": float(count_params(model)),
        "macs": float(count_macs(model.cpu().eval(), input_size)),
        "sparsity": weight_sparsity(model),
    }


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of conv and linear weights that are exactly zero."""
    total = zeros = 0
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            total += module.weight.numel()
            zeros += int((module.weight == 0).sum())
    return zeros / max(total, 1)


# ---------------------------------------------------------------------------------------------
# Unstructured: magnitude masks (stages/sparsity.py), kept by the shared loop as weights fixed at zero.


def _unstructured_step(state: ModelState, config: PruneConfig, ctx: StageContext, step: int, _pruner) -> None:
    weights = {f"{n}.weight" if n else "weight": m.weight.detach().cpu() for n, m in state.model.named_modules()
               if isinstance(m, PRUNABLE)}  # fmt: skip
    target = step_ratio(config.pruning_ratio, step, config.iterative_steps)
    for name, mask in magnitude_masks(weights, state.fixed, target, config.scope).items():
        state.fixed.fix_(name, mask, torch.zeros_like(weights[name]))
    state.fixed.project_(state.model)


# ---------------------------------------------------------------------------------------------
# Structured: torch-pruning's dependency graph removes channels; fixed masks follow the surgery.


def _structured_step(state: ModelState, config: PruneConfig, ctx: StageContext, step: int, pruner) -> None:
    model = state.model.cpu()
    if config.importance == "taylor":
        _accumulate_gradients(model, ctx, config.taylor_batches)
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    for group in pruner.step(interactive=True):
        prune_group_(group, pruner.DG, names, state.fixed)
    model.zero_grad(set_to_none=True)
    sync_attention_(model, pruner)
    _check_forward(model, ctx.data.input_size)


@register_structural_change("prune_channels")
def _replay_pruned_channels(model: nn.Module, args: dict[str, Any]) -> nn.Module:
    """Structured pruning shrank layers in place: their new channel counts and tensor shapes."""
    return resize_(model, args)


def _accumulate_gradients(model: nn.Module, ctx: StageContext, batches: int) -> None:
    """Gradients for the Taylor criterion, in eval mode so BatchNorm statistics are not changed."""
    model.eval()
    model.zero_grad(set_to_none=True)
    loader = ctx.data.train_loader(ctx.data_config.batch_size, seed=ctx.seed, augment=False)
    for i, (images, labels) in enumerate(loader):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(images), labels).backward()


def _check_forward(model: nn.Module, input_size) -> None:
    """Run the pruned model once; on failure name the innermost layer whose forward raised."""
    active: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module, _inputs) -> None:
        active.append(names[module])

    def leave(_module, _inputs, _output) -> None:  # must return None: a returned value replaces the output
        active.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.inference_mode():
            model(torch.zeros(2, *input_size))
    except Exception as err:
        layer = active[-1] if active else ""
        where = f"layer {layer!r} ({type(model.get_submodule(layer)).__name__})" if layer else "its top-level forward"
        raise RuntimeError(
            f"structured pruning left {type(model).__name__} unable to run: {where} failed with {err}. "
            "This model cannot be pruned structurally; use method: unstructured"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
