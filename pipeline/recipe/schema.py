"""A recipe's schema: data, model, baseline training and the chain of stages, or a sweep or search of them; and the
chain one recipe runs (`as_chain`). Loading, overrides and inheritance are in `loading`, whole-recipe checks in
`checks`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from pipeline.core.checkpoints import CheckpointConfig
from pipeline.core.config import StrictConfig
from pipeline.core.data import DataConfig
from pipeline.core.metrics import EvalConfig
from pipeline.core.models import ModelConfig
from pipeline.core.training import TrainConfig
from pipeline.deploy import DeployConfig
from pipeline.search.config import SearchConfig


@dataclass(frozen=True)
class StageSpec:
    """One entry of `stages:`: the registered stage name and its validated config."""

    name: str
    config: StrictConfig

    def to_dict(self) -> dict[str, Any]:
        return {self.name: self.config.model_dump(mode="json")}


class Budget(StrictConfig):
    """A fixed training budget: every ordering of a sweep trains the same epochs in all, split by position,
    so orderings are compared on equal terms (the Prune-Quantize-Distill study's ordering ablation)."""

    epochs: int = Field(
        ge=1, le=10_000, description="training epochs of each chain's stages in all (baseline excluded)"
    )
    split: tuple[float, ...] = Field(
        description="relative share of `epochs` for the stage at each position, e.g. [20, 40, 40]; a shorter "
        "ordering (a single technique) uses the first shares, rescaled to the whole budget"
    )

    @field_validator("split")
    @classmethod
    def _positive_shares(cls, split: tuple[float, ...]) -> tuple[float, ...]:
        if not split or any(not (share > 0 and math.isfinite(share)) for share in split):
            raise ValueError(f"must be positive shares, one per stage position, e.g. [20, 40, 40]; got {list(split)}")
        return split

    def stage_epochs(self, stages: int) -> list[int]:
        """Whole epochs for the first `stages` positions, summing to `epochs` (largest-remainder rounding)."""
        shares = self.split[:stages]
        exact = [self.epochs * share / sum(shares) for share in shares]
        out = [math.floor(x) for x in exact]
        by_remainder = sorted(range(stages), key=lambda i: exact[i] - out[i], reverse=True)
        for i in by_remainder[: self.epochs - sum(out)]:
            out[i] += 1
        return out


class ExecutorConfig(StrictConfig):
    """How a sweep's orderings run; the sweep command's --executor, --address, --cpus/gpus-per-ordering override it."""

    name: Literal["local", "ray"] = Field("local", description="local: one after another; ray: one Ray task each")
    address: str | None = Field(None, description="ray: the cluster to join (host:port or auto); none: a local Ray")
    cpus: float = Field(1.0, gt=0, le=1024, description="ray: CPUs each ordering's task asks for")
    gpus: float = Field(0.0, ge=0, le=64, description="ray: GPUs each ordering's task asks for")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        """`executor: ray` is short for `executor: {name: ray}`."""
        return {"name": value} if isinstance(value, str) else value


class DistributedConfig(StrictConfig):
    """Settings of multi-process training under torchrun (ignored in a single process)."""

    timeout_minutes: float = Field(
        60.0,
        gt=0,
        le=24 * 60,
        description="how long a rank waits at a collective (the barrier while rank 0 evaluates a stage included) "
        "before the job fails",
    )
    sync_batchnorm: bool = Field(
        False, description="BatchNorm statistics over every rank's part of a batch (SyncBatchNorm; GPUs only)"
    )


class Recipe(StrictConfig):
    """A whole recipe: data, model, baseline training, and the chain of compression stages (or a sweep of
    orderings of them)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100, description="recipe name")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed for model init, data order, augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    baseline: TrainConfig
    stages: list[Any] = Field(default_factory=list, description="ordered one-key mappings {stage: config}")
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    deploy: DeployConfig = Field(
        default_factory=DeployConfig, description="runtimes every stage's model is exported to and measured in"
    )
    orderings: Any = Field(
        None,
        description="a sweep: `all` (every permutation of `stages`) or a list of orderings of their names; "
        "run with `make sweep`",
    )
    include_singles: bool = Field(False, description="a sweep also runs each stage alone after the baseline")
    budget: Budget | None = Field(None, description="fixed training epochs per chain, split by stage position")
    seeds: int | list[int] | None = Field(
        None,
        description="repeat every chain once per seed: a count n (seeds `seed` … `seed`+n-1) or a list of seeds; "
        "run with `make sweep` (each (ordering, seed) chain is tracked with a `seed` tag)",
    )
    seed_scope: Literal["baseline", "stages"] = Field(
        "baseline",
        description="with seeds: `baseline` retrains the baseline per seed, so the spread across seeds includes "
        "the baseline's (the honest default); `stages` trains one baseline (with `seed`) and varies only the "
        "stages after it (cheaper; reports say so)",
    )
    control: bool | None = Field(
        None,
        description="add an equal-training control: the baseline continued in fp32 (a `train` stage) for as many "
        "epochs as a chain trains, with the optimizer, LR and schedule of the chain's first training stage, so "
        "each result reads against the baseline trained as long; default: on for sweeps, off for one chain "
        "(`control: true` on a chain makes it a sweep of the chain and its control)",
    )
    control_epochs: int | None = Field(
        None, ge=1, le=10_000, description="set on a control chain itself: the chain epochs it matches"
    )
    stage_seed: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="seed of the stages after the baseline when it differs from `seed` (set per chain by "
        "`seeds` with seed_scope: stages)",
    )
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig, description="how a sweep's orderings (a search's trials) run"
    )
    search: SearchConfig | None = Field(
        None, description="a search over orderings and stage settings (Optuna); run with `make search`"
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig,
        description="checkpoints inside a training stage, which a killed run resumes from (part of no cache key)",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="multi-process training under torchrun"
    )

    @field_validator("orderings")
    @classmethod
    def _all_or_lists_of_names(cls, value: Any) -> Any:
        ok = value in (None, "all") or (
            isinstance(value, list) and all(isinstance(o, list) and all(isinstance(n, str) for n in o) for o in value)
        )
        if not ok:
            raise ValueError(f"must be `all` or a list of orderings (lists of stage names), got {value!r}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seed_count_or_list(cls, seeds: int | list[int] | None) -> int | list[int] | None:
        if isinstance(seeds, int) and not 1 <= seeds <= 100:
            raise ValueError(f"a count of seeds must be 1..100, got {seeds}")
        if isinstance(seeds, list):
            if not seeds:
                raise ValueError("must list at least one seed, or give a count (seeds: 3)")
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds must be distinct, got {seeds}")
            if any(not 0 <= x <= 2**31 - 1 for x in seeds):
                raise ValueError(f"each seed must be in 0..2^31-1, got {seeds}")
        return seeds

    def seed_list(self) -> list[int]:
        """The seeds every chain runs with: `seeds` expanded, or just `seed`."""
        if self.seeds is None:
            return [self.seed]
        return list(self.seeds) if isinstance(self.seeds, list) else [self.seed + i for i in range(self.seeds)]

    @property
    def chain_seed(self) -> int:
        """The seed that tells this chain's repetitions apart: the stages' seed (the baseline's unless set apart)."""
        return self.seed if self.stage_seed is None else self.stage_seed

    def stage_specs(self) -> list[StageSpec]:
        return list(self.stages)

    @property
    def ordering(self) -> str:
        """Stage names joined by '>', e.g. 'prune>inq>distill' ('train' for a baseline-only recipe)."""
        if self.control_epochs is not None:
            return f"control({self.control_epochs} ep)"
        return ">".join(s.name for s in self.stage_specs()) or "train"

    @property
    def is_search(self) -> bool:
        """Whether the recipe declares a search (`search:`): its trials are chains the search samples."""
        return self.search is not None

    @property
    def is_sweep(self) -> bool:
        """Whether the recipe declares a sweep (`orderings:`, `include_singles:` or `seeds:`) rather than one chain."""
        return self.orderings is not None or self.include_singles or self.seeds is not None or bool(self.control)

    def as_chain(self, names: Sequence[str] | None = None, seed: int | None = None) -> Recipe:
        """One concrete chain: the named stages (default: all, in recipe order) with the budget applied to
        their epochs, and no sweep keys, so it runs, caches and reads back like a hand-written recipe.

        `seed` (one of `seed_list()`) sets the baseline's seed, or with seed_scope: stages only the stages'."""
        by_name = {s.name: s for s in self.stage_specs()}
        specs = [by_name[n] for n in names] if names is not None else self.stage_specs()
        if self.budget is not None:
            epochs = self.budget.stage_epochs(len(specs))
            specs = [StageSpec(s.name, s.config.with_total_epochs(e)) for s, e in zip(specs, epochs, strict=True)]
        update: dict[str, Any] = {"stages": specs, "orderings": None, "include_singles": False, "budget": None,
                                  "seeds": None, "control": None, "search": None}  # fmt: skip
        if seed is not None and self.seed_scope == "baseline":
            update.update(seed=seed, stage_seed=None)
        elif seed is not None:
            update["stage_seed"] = None if seed == self.seed else seed
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        sweep_keys = {"orderings", "include_singles", "budget", "executor", "seeds", "seed_scope", "control"}
        unset = {k for k in ("stage_seed", "control_epochs", "search") if getattr(self, k) is None}
        out = self.model_dump(mode="json", exclude={"stages", *sweep_keys} | unset)
        out["stages"] = [s.to_dict() for s in self.stage_specs()]
        if self.is_sweep or self.is_search or self.budget is not None:
            out.update(self.model_dump(mode="json", include=sweep_keys))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
