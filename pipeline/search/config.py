"""The `search:` block of a recipe: what a search explores, what it optimises, what it must respect, and for how long.

```yaml
search:
  orderings: all                 # every runnable ordering of every subset of `stages:`; or permutations; or a list
  space:                         # stage fields (and budget.epochs) to sample; the rest keep the recipe's value
    prune.pruning_ratio: {low: 0.2, high: 0.8, step: 0.1}
    qat.lr: {low: 0.001, high: 0.02, log: true}
    distill.temperature: {choices: [2.0, 4.0, 8.0]}
  objectives: {val_top1: max, artifact_bytes: min, onnxruntime.latency_ms_p50: min}
  constraints: ["val_top1 >= 79", "artifact_bytes <= 2e6"]
  trials: 40                     # and/or timeout_minutes
  pruner: {method: successive_halving, peers: [ordering, prune.pruning_ratio]}   # stop trials behind their peers
  confirm_seeds: 2               # run the Pareto set again with 2 more seeds; frontier and registry on the means
```

Only the config lives here (validated when the recipe loads, with the checks against the recipe's stages and metrics
in `pipeline.recipe`); `pipeline.search.search` runs it.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.config import StrictConfig

DIRECTIONS = ("max", "min")
ORDERING_PARAM = "ordering"  # the Optuna parameter holding a trial's ordering ('prune>qat')
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def is_integer_field(config: type, name: str) -> bool:
    """Whether a config field holds whole numbers (`int`, `int | None`), so a range of it is sampled as integers."""
    annotation = config.model_fields[name].annotation
    args = set(typing.get_args(annotation)) or {annotation}
    return int in args and float not in args


class ParamRange(StrictConfig):
    """The values one field may take: `choices`, or a range `low`..`high` (both included), optionally on a grid
    (`step`) or sampled on a log scale (`log`). A field of integers is sampled as integers."""

    low: float | None = Field(None, description="smallest value of a range")
    high: float | None = Field(None, description="largest value of a range")
    step: float | None = Field(None, gt=0, description="grid spacing of a range (discrete values reuse the cache)")
    log: bool = Field(False, description="sample the range on a log scale (not with `step`)")
    choices: list[Any] | None = Field(None, description="the values to choose among, instead of a range")

    @model_validator(mode="after")
    def _range_or_choices(self) -> ParamRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either `choices` or a range (`low`, `high`, `step`, `log`), not both")
            if not self.choices:
                raise ValueError("`choices` is empty: list at least one value")
            if any(not isinstance(c, str | int | float | bool) and c is not None for c in self.choices):
                raise ValueError(f"`choices` must be numbers, strings, true/false or null, got {self.choices}")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"`choices` repeats a value: {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs `low` and `high` (or give `choices`)")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"empty range: `low` ({self.low:g}) must be below `high` ({self.high:g})")
        if self.log and self.step is not None:
            raise ValueError("`log` and `step` cannot be combined")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs `low` > 0, got {self.low:g}")
        if self.step is not None and self.step > self.high - self.low:
            raise ValueError(f"`step` ({self.step:g}) is wider than the range {self.low:g}..{self.high:g}")
        return self

    def endpoints(self) -> list[Any]:
        """The values whose validity stands for the whole set: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class Constraint:
    """A bound on a metric, `val_top1 >= 79` or `artifact_bytes <= 1e6`; feasible when `violation` is <= 0."""

    metric: str
    op: str  # '<=' or '>='
    bound: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        match = _CONSTRAINT.match(str(text))
        if match is None:
            raise ValueError(f"{text!r} must read `metric <= number` or `metric >= number`, e.g. 'val_top1 >= 79'")
        metric, op, bound = match.groups()
        return cls(metric, op, float(bound))

    def violation(self, value: float) -> float:
        """How far `value` is outside the bound, in the metric's unit (<= 0: satisfied)."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


class EarlyStopConfig(StrictConfig):
    """Ending a trial once a bound is out of reach: after a stage, a violated bound on a metric that no later stage
    of the chain can lower (stages declare it: `register_stage(lowers=)`; bytes after INQ, latency after pruning
    when only distillation follows) ends the chain there, recorded with the reason."""

    enabled: bool = Field(True, description="end trials whose constraints no later stage can bring back")
    timing_margin: float = Field(
        0.1,
        ge=0,
        le=10,
        description="timed metrics (latency, throughput) are noisy: a bound on one ends a trial only when missed by "
        "more than this share of the bound",
    )


PRUNERS = ("none", "median", "successive_halving", "hyperband")


class PrunerConfig(StrictConfig):
    """Stopping trials that are behind (multi-fidelity): after every epoch a trial trains, its model is scored on a
    fixed part of the validation split and the score is told to an Optuna pruner, which stops the trial when it is
    behind its peers at that many epochs. A pruned trial is recorded as pruned (never on the frontier).

    A pruner ranks by accuracy alone, while a search trades accuracy for size and speed: a trial that prunes more
    channels is behind in accuracy *because* it is smaller. `peers` says which trials one is compared with (default:
    those of its ordering); list there the space fields that set how hard a trial compresses (prune.pruning_ratio,
    inq.bits), so that a small model is only stopped for being behind models as small as itself."""

    method: Literal["none", "median", "successive_halving", "hyperband"] = Field(
        "none",
        description="none; median (stop a trial below the median of finished trials at the same epoch); "
        "successive_halving or hyperband (keep the top 1/reduction_factor at epochs min_epochs x reduction_factor^k)",
    )
    images: int = Field(
        2000, ge=100, le=1_000_000, description="validation images scored after every epoch (a fixed random part)"
    )
    warmup_epochs: int = Field(1, ge=0, le=10_000, description="median: epochs a trial trains before it may be stopped")
    startup_trials: int = Field(
        4, ge=0, le=10_000, description="median: finished trials among its peers before any trial is stopped"
    )
    min_epochs: int = Field(1, ge=1, le=10_000, description="successive_halving / hyperband: epochs of the first rung")
    max_epochs: int | None = Field(
        None, ge=1, le=100_000, description="hyperband: epochs of the longest trial (default: the longest chain's)"
    )
    reduction_factor: int = Field(3, ge=2, le=100, description="successive_halving / hyperband: 1 in this many goes on")
    peers: list[str] | Literal["ordering", "all"] = Field(
        "ordering",
        description="which trials a trial is compared with: `all`; `ordering` (those of its ordering); or a list of "
        "`ordering` and space fields that must be equal (e.g. [ordering, prune.pruning_ratio])",
    )

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def peer_keys(self) -> list[str]:
        """The trial parameters that define a trial's peers ('ordering' and space fields)."""
        if self.peers == "all":
            return []
        if self.peers == "ordering":
            return [ORDERING_PARAM]
        return list(self.peers)


class SearchConfig(StrictConfig):
    """A multi-objective search over orderings and stage settings (Optuna), each trial a chain through the runner."""

    orderings: Literal["all", "permutations"] | list[list[str]] = Field(
        "all",
        description="`all`: every runnable ordering of every non-empty subset of the stages; `permutations`: of all "
        "of them; or a list of orderings",
    )
    space: dict[str, ParamRange] = Field(
        default_factory=dict, description="`stage.field` (or `budget.epochs`) -> the values to sample"
    )
    objectives: dict[str, str] = Field(
        description="metric -> max or min, e.g. {val_top1: max, artifact_bytes: min}; a runtime's metrics carry its "
        "name (onnxruntime.latency_ms_p50)"
    )
    constraints: list[str] = Field(default_factory=list, description="bounds, e.g. ['val_top1 >= 79', 'macs <= 2e7']")
    trials: int | None = Field(20, ge=1, le=100_000, description="trials to finish (resumed searches count old ones)")
    timeout_minutes: float | None = Field(None, gt=0, description="wall-clock limit of one invocation, in minutes")
    sampler: Literal["tpe", "nsga2", "random"] = Field(
        "tpe", description="Optuna sampler: tpe (multivariate, constraint-aware), nsga2 or random"
    )
    startup_trials: int = Field(8, ge=1, le=10_000, description="tpe: random trials before the model-based ones")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the sampler's seed")
    workers: int = Field(1, ge=1, le=1024, description="trials at once (with executor ray; local runs one)")
    start_with: list[dict[str, Any]] = Field(
        default_factory=list,
        description="trials to run first, before the sampler proposes any: {ordering: 'prune>qat', "
        "'prune.pruning_ratio': 0.5}; space fields left out are sampled (e.g. a hand-written recipe to beat)",
    )
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    confirm_seeds: int = Field(
        0,
        ge=0,
        le=20,
        description="after the trials: run every Pareto configuration again with this many more seeds and choose the "
        "frontier and the registered model on the seed means (0: one seed, the trial's own)",
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL shared by workers; default $OPTUNA_STORAGE, else optuna.db beside the MLflow "
        "SQLite store (or in the cache folder)",
    )
    select: str | None = Field(
        None, description="the metric that picks the best feasible model to register; default the first objective"
    )
    registry_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="MLflow Model Registry name of the best model; default the recipe's name",
    )
    registry: bool = Field(True, description="register the best feasible model in the MLflow Model Registry")

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @field_validator("objectives")
    @classmethod
    def _directions(cls, objectives: dict[str, str]) -> dict[str, str]:
        if not objectives:
            raise ValueError("name at least one metric to optimise, e.g. {val_top1: max}")
        if len(objectives) > 4:
            raise ValueError(
                f"at most 4 objectives (the frontier gets hard to read and to search), got {len(objectives)}"
            )
        for metric, direction in objectives.items():
            if direction not in DIRECTIONS:
                raise ValueError(f"{metric}: direction must be max or min, got {direction!r}")
        return objectives

    @field_validator("constraints")
    @classmethod
    def _parsable(cls, constraints: list[str]) -> list[str]:
        for text in constraints:
            Constraint.parse(text)
        return constraints

    @model_validator(mode="after")
    def _some_budget(self) -> SearchConfig:
        if self.trials is None and self.timeout_minutes is None:
            raise ValueError("a search needs a budget: `trials`, `timeout_minutes`, or both")
        return self

    def parsed_constraints(self) -> list[Constraint]:
        return [Constraint.parse(text) for text in self.constraints]

    @property
    def selection_metric(self) -> str:
        return self.select or next(iter(self.objectives))


__all__ = [
    "ORDERING_PARAM",
    "PRUNERS",
    "Constraint",
    "is_integer_field",
    "EarlyStopConfig",
    "ParamRange",
    "PrunerConfig",
    "SearchConfig",
]
