"""Recipes: YAML files validated in full before any compute.

Every problem becomes a `RecipeError` naming the field path (`stages[1].train.lr`) and what is
allowed, so the CLI can exit 2 with one line, before any MLflow run or file is created.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.core.checkpoints import CheckpointConfig
from pipeline.core.config import StrictConfig
from pipeline.core.data import DataConfig
from pipeline.core.metrics import EvalConfig, metric_catalogue, validation_name
from pipeline.core.models import ModelConfig
from pipeline.core.training import TrainConfig
from pipeline.deploy import DeployConfig
from pipeline.recipe.resources import resource_problem
from pipeline.search.config import SearchConfig, is_integer_field
from stages import get_stage
from stages.base import UnknownStageError, chain_conflict, fp32_only_from

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class RecipeError(ValueError):
    """A recipe problem: `path` is the field (e.g. 'data.batch_size'), `message` what is wrong and allowed."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


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

    def control_chain(self, epochs: int, first_stage: StageSpec | None, seed: int | None = None) -> Recipe:
        """The equal-training control of chains that train `epochs` epochs: the baseline continued by a `train`
        stage with `first_stage`'s optimizer, LR and schedule (the baseline's when it has none)."""
        source = first_stage.config if first_stage and isinstance(first_stage.config, TrainConfig) else self.baseline
        fields = {k: v for k, v in source.model_dump().items() if k in TrainConfig.model_fields}
        control = StageSpec("train", TrainConfig.model_validate({**fields, "epochs": epochs}))
        chain = self.as_chain([], seed=seed)
        return chain.model_copy(update={"stages": [control], "control_epochs": epochs})

    def sweep_orderings(self) -> tuple[list[tuple[str, ...]], list[tuple[tuple[str, ...], str]]]:
        """(orderings to run, [(ordering, reason)] skipped): `all` (also when unset) is every permutation of
        the stages minus those a stage cannot follow (e.g. pruning after qat); singles are added last."""
        names = [s.name for s in self.stage_specs()]
        if self.orderings is None and (self.seeds is not None or self.control) and not self.include_singles:
            chosen = [names]  # seeds or a control alone: the recipe's own chain
        elif isinstance(self.orderings, list):
            chosen = self.orderings
        else:
            chosen = itertools.permutations(names)
        ordered: dict[tuple[str, ...], None] = dict.fromkeys(tuple(o) for o in chosen)
        if self.include_singles:
            ordered.update(dict.fromkeys((n,) for n in names))
        runnable, skipped = [], []
        for ordering in ordered:
            conflict = chain_conflict(list(ordering))
            if conflict is None:
                runnable.append(ordering)
            else:
                skipped.append((ordering, conflict[1]))
        return runnable, skipped

    def search_orderings(self) -> list[tuple[str, ...]]:
        """The orderings a search samples from (`search.orderings`), those a stage cannot follow left out."""
        assert self.search is not None
        names = [s.name for s in self.stage_specs()]
        if isinstance(self.search.orderings, list):
            chosen = [tuple(o) for o in self.search.orderings]
        elif self.search.orderings == "permutations":
            chosen = list(itertools.permutations(names))
        else:
            sizes = range(1, len(names) + 1)
            chosen = [
                o for k in sizes for subset in itertools.combinations(names, k) for o in itertools.permutations(subset)
            ]
        return [o for o in dict.fromkeys(chosen) if chain_conflict(list(o)) is None]

    def search_chain(self, ordering: Sequence[str], settings: dict[str, Any]) -> Recipe:
        """One trial's chain: the stages of `ordering` with the sampled `settings` ({"prune.pruning_ratio": 0.5,
        "budget.epochs": 6}) applied over the recipe's configs, then the budget, as `as_chain` does."""
        by_stage: dict[str, dict[str, Any]] = {}
        for key, value in settings.items():
            stage, _, name = key.partition(".")
            by_stage.setdefault(stage, {})[name] = value
        specs = []
        for spec in self.stage_specs():
            fields = by_stage.get(spec.name)
            config = type(spec.config).model_validate({**spec.config.model_dump(), **fields}) if fields else spec.config
            specs.append(StageSpec(spec.name, config))
        update: dict[str, Any] = {"stages": specs, "search": None}
        if "budget" in by_stage and self.budget is not None:
            update["budget"] = self.budget.model_copy(update=by_stage["budget"])
        return self.model_copy(update=update).as_chain(list(ordering))

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


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe name in recipes/ (with or without .yaml), or a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise RecipeError("", f"recipe file not found: {path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))
    raise RecipeError("", f"unknown recipe {name_or_path!r}; available: {', '.join(known)}")


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError (one line) on any problem."""
    path = resolve_recipe_path(str(name_or_path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError("", f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError("", f"{path} must hold a mapping of recipe keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override_(raw, item)
    return validate_recipe(raw)


def validate_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping: schema, stage names and configs, then files on disk."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise _as_recipe_error(err, Recipe) from None
    stages = [_validate_stage(i, entry) for i, entry in enumerate(recipe.stages)]
    recipe = recipe.model_copy(update={"stages": stages})
    if recipe.is_search:
        _check_search(recipe)
    elif recipe.is_sweep:
        _check_sweep(recipe)
    else:
        conflict = chain_conflict([s.name for s in stages])
        if conflict is not None:
            raise RecipeError(f"stages[{conflict[0]}]", conflict[1])
    if recipe.budget is not None:
        _check_budget(recipe)
    _check_precision(recipe)
    _check_resources(recipe)
    return recipe


def _chains_run(recipe: Recipe) -> list[tuple[str, ...]]:
    """Every ordering of stage names the recipe may run: its chain, its sweep's orderings, or its search's."""
    if recipe.is_search:
        return [tuple(o) for o in recipe.search_orderings()]
    if recipe.is_sweep:
        runnable, _ = recipe.sweep_orderings()
        return [tuple(o) for o in runnable]
    return [tuple(s.name for s in recipe.stage_specs())]


def _check_precision(recipe: Recipe) -> None:
    """An explicit bf16 / fp16 on a stage that would train a fake-quantized model (qat, and any stage after it in
    some ordering the recipe runs) is refused: fake quantization trains in fp32."""
    explicit = {s.name: i for i, s in enumerate(recipe.stage_specs())
                if getattr(s.config, "precision", "auto") in ("bf16", "fp16")}  # fmt: skip
    if not explicit:
        return
    for ordering in _chains_run(recipe):
        start = fp32_only_from(list(ordering))
        for name in ordering[start:]:
            if name in explicit:
                index = explicit[name]
                raise RecipeError(
                    f"stages[{index}].{name}.precision",
                    f"{recipe.stages[index].config.precision} cannot train a fake-quantized model ({name} runs at or "
                    f"after {ordering[start]} in {'>'.join(ordering)}); fake quantization trains in fp32: use auto or "
                    "fp32",
                )


def _check_sweep(recipe: Recipe) -> None:
    """Orderings name the recipe's stages, each once; explicit orderings must be runnable as written."""
    _check_unique_stage_names(recipe, "a sweep")
    names = [s.name for s in recipe.stage_specs()]
    if isinstance(recipe.orderings, list):
        _check_orderings(recipe.orderings, names, "orderings")
    elif not names:
        raise RecipeError("stages", "a sweep needs at least one stage to order")


def _check_unique_stage_names(recipe: Recipe, what: str) -> None:
    names = [s.name for s in recipe.stage_specs()]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise RecipeError(
                f"stages[{index}]", f"{what} names stages by name, so each may appear once; {name!r} repeats"
            )


def _check_orderings(orderings: list[list[str]], names: list[str], path: str) -> None:
    """Each ordering names stages of the recipe, each once, in an order every stage can follow."""
    if not orderings:
        raise RecipeError(path, "needs at least one ordering (or `all`)")
    for k, ordering in enumerate(orderings):
        if not ordering:
            raise RecipeError(f"{path}[{k}]", "an ordering needs at least one stage")
        for j, name in enumerate(ordering):
            if name not in names:
                raise RecipeError(
                    f"{path}[{k}][{j}]", f"{name!r} is not one of the recipe's stages: {', '.join(names)}"
                )
            if name in ordering[:j]:
                raise RecipeError(f"{path}[{k}][{j}]", f"{name!r} appears twice in one ordering")
        conflict = chain_conflict(ordering)
        if conflict is not None:
            raise RecipeError(f"{path}[{k}][{conflict[0]}]", conflict[1])


def _check_search(recipe: Recipe) -> None:
    """The search's orderings, space, objectives and constraints against the recipe's stages and measured metrics."""
    assert recipe.search is not None
    search = recipe.search
    for key in ("orderings", "seeds", "control"):
        if getattr(recipe, key) not in (None, False) or (key == "orderings" and recipe.include_singles):
            raise RecipeError(key, "a search chooses its chains itself: use `search.orderings`, or run the sweep apart")
    _check_unique_stage_names(recipe, "a search")
    names = [s.name for s in recipe.stage_specs()]
    if not names:
        raise RecipeError("stages", "a search needs at least one stage to order")
    if isinstance(search.orderings, list):
        _check_orderings(search.orderings, names, "search.orderings")
    if not recipe.search_orderings():
        raise RecipeError("search.orderings", "no ordering can run: every one has a stage that cannot follow another")
    specs = {s.name: s for s in recipe.stage_specs()}
    for key, values in search.space.items():
        _check_search_field(recipe, specs, key, values.endpoints())
    for index, entry in enumerate(search.start_with):
        _check_start_with(recipe, f"search.start_with[{index}]", entry)
    catalogue = metric_catalogue(recipe.deploy.runtimes)
    known = ", ".join(catalogue)
    chosen_on = [(f"search.objectives.{m}", m) for m in search.objectives]
    chosen_on += [(f"search.constraints[{i}]", c.metric) for i, c in enumerate(search.parsed_constraints())]
    chosen_on += [("search.select", search.select)] if search.select else []
    for path, metric in chosen_on:
        if (instead := validation_name(metric)) is not None:
            raise RecipeError(path, f"{metric} is the test split's accuracy, which is reported and never chosen on "
                              f"(choosing on it overstates the result); use {instead}")  # fmt: skip
    for metric in (*search.objectives, *(c.metric for c in search.parsed_constraints()), search.selection_metric):
        if metric not in catalogue:
            where = "deploy.runtimes does not measure it" if "." in metric else "not a metric the evaluator logs"
            raise RecipeError("search", f"unknown metric {metric!r} ({where}); known: {known}")
    for metric in search.objectives:
        if catalogue[metric][0] is None:
            raise RecipeError(f"search.objectives.{metric}", "has no better direction; choose another metric")


def _check_search_field(recipe: Recipe, specs: dict[str, StageSpec], key: str, values: list[Any]) -> None:
    """`stage.field` names a field of a stage in `stages:` (or `budget.epochs` a set budget); each end is valid."""
    path = f"search.space.{key}"
    stage, _, name = key.partition(".")
    if key == "budget.epochs":
        if recipe.budget is None:
            raise RecipeError(path, "the recipe sets no `budget:` to vary")
        _check_whole_numbers(path, search_values(recipe, key), True)
        for value in values:
            try:
                recipe.budget.model_validate({**recipe.budget.model_dump(), "epochs": value})
            except ValidationError as err:
                raise RecipeError(path, f"{value!r}: {err.errors(include_url=False)[0]['msg']}") from None
        return
    if stage not in specs or not name:
        raise RecipeError(
            path, f"must be `stage.field` with a stage of `stages:` ({', '.join(specs)}) or budget.epochs"
        )
    config = specs[stage].config
    if name not in type(config).model_fields:
        raise RecipeError(path, f"{stage} has no field {name!r}; fields: {', '.join(type(config).model_fields)}")
    if recipe.budget is not None and name == "epochs":
        raise RecipeError(path, "the recipe's `budget:` sets every stage's epochs; vary budget.epochs instead")
    _check_whole_numbers(path, search_values(recipe, key), is_integer_field(type(config), name))
    for value in values:
        try:
            type(config).model_validate({**config.model_dump(), name: value})
        except ValidationError as err:
            raise RecipeError(path, f"{value!r}: {err.errors(include_url=False)[0]['msg']}") from None


def _check_start_with(recipe: Recipe, path: str, entry: dict[str, Any]) -> None:
    """A trial to start with: a runnable ordering of the search, and values of its space inside their ranges."""
    assert recipe.search is not None
    ordering = entry.get("ordering")
    allowed = [">".join(o) for o in recipe.search_orderings()]
    if ordering not in allowed:
        raise RecipeError(f"{path}.ordering", f"must be one of the search's orderings ({', '.join(allowed)}), "
                          f"got {ordering!r}")  # fmt: skip
    for key, value in entry.items():
        if key == "ordering":
            continue
        if key not in recipe.search.space:
            raise RecipeError(f"{path}.{key}", f"not a field of search.space ({', '.join(recipe.search.space)})")
        if key != "budget.epochs" and key.partition(".")[0] not in ordering.split(">"):
            raise RecipeError(f"{path}.{key}", f"the ordering {ordering} has no {key.partition('.')[0]} stage")
        values = recipe.search.space[key]
        inside = value in values.choices if values.choices is not None else (
            isinstance(value, int | float) and values.low <= value <= values.high)  # fmt: skip
        if not inside:
            allowed_values = values.choices if values.choices is not None else f"{values.low:g}..{values.high:g}"
            raise RecipeError(f"{path}.{key}", f"{value!r} is outside the space: {allowed_values}")


def search_values(recipe: Recipe, key: str):
    assert recipe.search is not None
    return recipe.search.space[key]


def _check_whole_numbers(path: str, values, integer: bool) -> None:
    """A range of a whole-number field needs whole-number ends and step (it is sampled as integers)."""
    if not integer or values.choices is not None:
        return
    for what in ("low", "high", "step"):
        value = getattr(values, what)
        if value is not None and float(value) != int(value):
            raise RecipeError(path, f"the field takes whole numbers: `{what}` must be one, got {value:g}")


def _check_budget(recipe: Recipe) -> None:
    """Every position of every chain gets a share and at least one epoch; every stage trains."""
    assert recipe.budget is not None
    if recipe.is_search:
        lengths = {len(o) for o in recipe.search_orderings()}
    elif recipe.is_sweep:
        lengths = {len(o) for o in recipe.sweep_orderings()[0]}
    else:
        lengths = {len(recipe.stages)}
    longest = max(lengths, default=0)
    if len(recipe.budget.split) < longest:
        raise RecipeError(
            "budget.split", f"needs a share for each of {longest} stage positions, got {len(recipe.budget.split)}"
        )
    for length in sorted(lengths - {0}):
        epochs = recipe.budget.stage_epochs(length)
        if min(epochs) < 1:
            raise RecipeError(
                "budget",
                f"gives a chain of {length} stages {epochs} epochs; every stage needs at least "
                "one: raise `epochs` or even out `split`",
            )
    for index, spec in enumerate(recipe.stage_specs()):
        if not hasattr(spec.config, "with_total_epochs"):
            raise RecipeError(f"stages[{index}].{spec.name}", "does not train, so a budget cannot set its epochs")


def _validate_stage(index: int, entry: Any) -> StageSpec:
    path = f"stages[{index}]"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise RecipeError(path, f"must be a one-key mapping {{stage_name: config}}, got {entry!r}")
    ((name, cfg),) = entry.items()
    try:
        stage = get_stage(str(name))
    except UnknownStageError as err:
        raise RecipeError(path, str(err)) from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise RecipeError(f"{path}.{name}", f"must be a mapping of config keys, got {cfg!r}")
    try:
        return StageSpec(str(name), stage.config.model_validate(cfg))
    except ValidationError as err:
        raise _as_recipe_error(err, stage.config, prefix=f"{path}.{name}") from None


def _check_resources(recipe: Recipe) -> None:
    """The recipe against what is on disk: the data, the model on the data's input size, the teachers' heads."""
    problem = resource_problem(recipe)
    if problem is not None:
        raise RecipeError(*problem)


# ---------------------------------------------------------------------------------------------
# Overrides: `data.train_subset=2000`, `stages[1].train.lr=0.01` or `stages.1.train.lr=0.01`.

_INDEX = re.compile(r"\[(\d+)\]")


def apply_override_(raw: dict[str, Any], item: str) -> None:
    """Set one dotted `key=value` in the raw recipe mapping; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError("", f"override {item!r} must look like key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = [p for p in _INDEX.sub(r".\1", key.strip()).split(".") if p]
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(where, f"no list item {part!r} to override (the list has {len(node)} items)")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(where, f"cannot override inside a {type(node).__name__}")
        if isinstance(node, dict) and depth >= 2 and parts[0] == "stages" and depth == 2 and part not in node:
            raise RecipeError(where, f"stages[{parts[1]}] is a {next(iter(node), '?')!r} stage, not {part!r}")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


# ---------------------------------------------------------------------------------------------
# Turning pydantic's errors into one line with a field path.


def _loc_to_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _as_recipe_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> RecipeError:
    first = err.errors(include_url=False)[0]
    loc, kind = tuple(first["loc"]), first["type"]
    path = _loc_to_path(loc, prefix)
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else "see the README"
        return RecipeError(path, f"unknown key; allowed: {allowed}")
    if kind == "missing":
        return RecipeError(path, "required field is missing")
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if "input" in first and kind not in {"value_error"}:
        message += f", got {first['input']!r}"
    return RecipeError(path, message)
