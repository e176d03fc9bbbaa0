"""The stage protocol and registry.

A stage is a function `run(state, config, ctx) -> StageOutput`, registered under the name a recipe
uses, with the config class that validates its recipe entry. Caching, evaluation, tracking and
artifacts are the runner's job, so a stage only transforms a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipeline.core.checkpoints import StageCheckpoints
from pipeline.core.config import StrictConfig
from pipeline.core.data import DataBundle, DataConfig
from pipeline.core.models import ModelConfig, ModelState
from pipeline.core.training import LoopHooks, LossFn, TrainConfig, TrainReport, train_

# Kinds of metric a stage may lower (see `register_stage(lowers=)`): `bytes`, what the model takes to store or ship
# (artifact and exported file bytes, non-zero weights); `compute`, what it takes to run (parameters, MACs, latency,
# throughput). Accuracy is not among them: any stage that trains may raise or lower it.
METRIC_KINDS = frozenset({"bytes", "compute"})


@dataclass
class StageContext:
    """What a stage may use besides its input model and config."""

    data: DataBundle
    data_config: DataConfig
    model_config: ModelConfig
    device: torch.device
    seed: int
    baseline: Callable[[], ModelState]
    progress: bool = True
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    # Where the stage's fit calls write checkpoints and resume from (None: no checkpoints); shared by copies of the
    # context (`dataclasses.replace`), so the calls are counted once per stage run.
    checkpoints: StageCheckpoints | None = None
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics over every rank's part of the batch
    # Measured after every epoch of every fit, into the epoch's stats (a search's pruner reads the validation
    # accuracy so: `pipeline.core.metrics.epoch_validation`); None: nothing beyond the loop's own stats.
    epoch_eval: Callable[[torch.nn.Module], dict[str, float]] | None = None

    def fit(
        self,
        state: ModelState,
        config: TrainConfig,
        *,
        desc: str,
        step: int = 0,
        epoch_offset: int = 0,
        loss: LossFn | None = None,
        extra_stats: dict[str, float] | None = None,
    ) -> TrainReport:
        """Train `state.model` through the shared loop on this context's data and device, keeping `state.fixed`.

        `step` varies the data order between repeated calls of one stage; `epoch_offset` continues the
        epoch count so the tracked curves of repeated calls do not overwrite each other; `extra_stats`
        are added to every epoch's tracked stats and report entry. Each call has its own checkpoint (see
        `pipeline.core.checkpoints`): a stage must make its fit calls in the same order whenever it runs.
        """
        extra = dict(extra_stats or {})
        loader = self.data.train_loader(self.data_config.batch_size, seed=self.seed + step,
                                        augment=self.data_config.augment, device=self.device)  # fmt: skip
        on_epoch_end = None
        if self.on_epoch_end is not None:
            outer = self.on_epoch_end

            def on_epoch_end(epoch: int, stats: dict[str, float]) -> None:
                outer(epoch_offset + epoch, {**stats, **extra})

        hooks = LoopHooks(loss=loss, on_epoch_end=on_epoch_end, evaluate=self.epoch_eval)
        checkpoint = self.checkpoints.next_fit() if self.checkpoints is not None else None
        report = train_(state.model, loader, config, fixed=state.fixed, device=self.device, hooks=hooks, desc=desc,
                        progress=self.progress, checkpoint=checkpoint, sync_batchnorm=self.sync_batchnorm,
                        input_size=self.data.input_size)  # fmt: skip
        for entry in report.history:
            entry.update(extra)
        return report


@dataclass
class StageOutput:
    """The new model state, the stage's own measurements (e.g. achieved sparsity), its training report."""

    state: ModelState
    metrics: dict[str, float] = field(default_factory=dict)
    report: TrainReport | None = None


class StageFn(Protocol):
    def __call__(self, state: ModelState | None, config: StrictConfig, ctx: StageContext) -> StageOutput: ...


@dataclass(frozen=True)
class StageEntry:
    name: str
    config: type[StrictConfig]
    run: StageFn
    # Which chains are refused when the recipe loads, instead of after the earlier stages have run. A stage
    # names the stages whose output it cannot take (`not_after`: low-rank factorisation would undo INQ's
    # powers of two), and may restrict what can follow it (`may_follow`: only stages that keep fake-quant
    # intact after qat; None allows any), so neither side has to know the other when it is written.
    not_after: frozenset[str] = frozenset()
    may_follow: frozenset[str] | None = None
    # Which kinds of metric the stage can lower (METRIC_KINDS: `bytes`, `compute`), given its config: a search
    # ends a trial early once a bound on such a metric is out of reach of every stage still to run. None: any.
    lowers: Callable[[StrictConfig], frozenset[str]] | None = None
    # Its output model carries fake quantization, which it and every later stage of the chain train in fp32
    # (`pipeline.core.precision`): `precision: auto` resolves to fp32 there, and an explicit bf16 / fp16 is refused.
    fake_quant: bool = False
    # The version of what the stage computes, part of its cache key: bumped whenever its code changes what it
    # computes, so results of the old code are never served (tests/test_code_versions.py notices a change of the
    # stage's source that was not recorded).
    version: int = 1
    # It renames the layers it changes (low-rank factorisation splits one into two), so layer names other stages'
    # options give (`qat.fp32_layers`, a per-layer `inq.bits` map) can only be checked when they run, not at load.
    renames_layers: bool = False
    # How the ordering shows this stage's variant, from its config ('structured', '5-bit'); None: it has none. Keeps
    # e.g. structured and unstructured pruning from reading as the same ordering.
    variant: Callable[[StrictConfig], str] | None = None
    # What the stage cannot do on a model, found when the recipe loads: (a fresh build of the recipe's model on the CPU,
    # its config, the input size) -> why not, or None. Refused there instead of failing after earlier stages trained.
    check: Callable[[torch.nn.Module, StrictConfig, tuple[int, ...]], str | None] | None = None

    def can_lower(self, config: StrictConfig) -> frozenset[str] | None:
        """The metric kinds this stage, so configured, may lower; None when it does not say (assume any)."""
        return None if self.lowers is None else frozenset(self.lowers(config))

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0] if self.run.__doc__ else ""


class UnknownStageError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


_REGISTRY: dict[str, StageEntry] = {}


def register_stage(
    name: str,
    *,
    config: type[StrictConfig],
    not_after: frozenset[str] | set[str] = frozenset(),
    may_follow: frozenset[str] | set[str] | None = None,
    lowers: Callable[[Any], frozenset[str] | set[str]] | frozenset[str] | set[str] | None = None,
    fake_quant: bool = False,
    version: int = 1,
    renames_layers: bool = False,
    variant: Callable[[Any], str] | None = None,
    check: Callable[[Any, Any, tuple[int, ...]], str | None] | None = None,
):
    """Register a stage function under `name`, validated by `config`.

    It cannot follow the stages in `not_after`; when `may_follow` is given, only those stages may run after it.
    `lowers` names the metric kinds (METRIC_KINDS) the stage can lower, or maps its config to them; unset, a search
    assumes it may lower any metric and never ends a trial early on its account. `fake_quant`: the stage's output
    carries fake quantization, so it and every later stage train in fp32. `version`: of what the stage computes,
    in its cache key; bump it when a change of its code changes its output. `renames_layers`: it renames the layers
    it changes (layer names in other stages' options are then checked when they run). `variant`: how an ordering
    shows the configured stage (`prune[structured]`). `check`: what it cannot do on a model, asked when the recipe
    loads (a fresh CPU build of the model, the config, the input size -> a reason, or None).
    """

    def wrap(fn: StageFn) -> StageFn:
        if name in _REGISTRY:
            raise ValueError(f"stage {name!r} is registered twice")
        allowed = None if may_follow is None else frozenset(may_follow)
        kinds = lowers if lowers is None or callable(lowers) else (lambda _config, fixed=frozenset(lowers): fixed)
        if not callable(lowers) and lowers is not None and not set(lowers) <= METRIC_KINDS:
            raise ValueError(f"stage {name!r}: lowers must be among {sorted(METRIC_KINDS)}, got {sorted(lowers)}")
        _REGISTRY[name] = StageEntry(name, config, fn, frozenset(not_after), allowed, kinds, fake_quant, version,
                                     renames_layers, variant, check)  # fmt: skip
        return fn

    return wrap


def available_stages() -> list[str]:
    return sorted(_REGISTRY)


def get_stage(name: str) -> StageEntry:
    """The registered stage, or an error naming the known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownStageError(f"unknown stage {name!r}; available: {', '.join(available_stages())}")


def chain_conflict(names: list[str]) -> tuple[int, str] | None:
    """(index, reason) of the first stage in `names` that cannot follow an earlier one, else None."""
    for index, name in enumerate(names):
        blocked = get_stage(name).not_after
        for earlier in names[:index]:
            allowed = get_stage(earlier).may_follow
            if earlier in blocked or (allowed is not None and name not in allowed):
                return index, f"{name} cannot run after {earlier}; put {name} before {earlier}"
    return None


def fp32_only_from(names: list[str]) -> int:
    """The index of the first stage in `names` whose output is fake-quantized (it and every later stage train in
    fp32); len(names) when there is none."""
    return next((i for i, name in enumerate(names) if get_stage(name).fake_quant), len(names))
