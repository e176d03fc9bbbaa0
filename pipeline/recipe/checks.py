"""Whole-recipe checks, run when a recipe loads and before any compute: every stage's config, the chain (or every
ordering of a sweep or search) runnable, the budget, precision against fake quantization, and the recipe against
what is on disk (`resources`)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from pipeline.deploy import channel_multiple
from pipeline.recipe.errors import RecipeError, as_recipe_error
from pipeline.recipe.resources import resource_problem
from pipeline.recipe.schema import Recipe, StageSpec
from pipeline.search.checks import check_search
from pipeline.search.space import search_orderings
from pipeline.sweep.orderings import check_sweep, sweep_orderings
from stages import get_stage
from stages.base import UnknownStageError, chain_conflict, fp32_only_from


def validate_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping: schema, stage names and configs, then files on disk."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise as_recipe_error(err, Recipe) from None
    multiple = channel_multiple(recipe.deploy.runtimes)
    stages = [_deploy_defaults(_validate_stage(i, entry), multiple) for i, entry in enumerate(recipe.stages)]
    recipe = recipe.model_copy(update={"stages": stages})
    if recipe.is_search:
        check_search(recipe)
    elif recipe.is_sweep:
        check_sweep(recipe)
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
        return [tuple(o) for o in search_orderings(recipe)]
    if recipe.is_sweep:
        runnable, _ = sweep_orderings(recipe)
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


def _check_budget(recipe: Recipe) -> None:
    """Every position of every chain gets a share and at least one epoch; every stage trains."""
    assert recipe.budget is not None
    if recipe.is_search:
        lengths = {len(o) for o in search_orderings(recipe)}
    elif recipe.is_sweep:
        lengths = {len(o) for o in sweep_orderings(recipe)[0]}
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


def _deploy_defaults(spec: StageSpec, multiple: int) -> StageSpec:
    """A stage config's defaults that depend on where the model ships, resolved when the recipe loads so that they are
    part of its cache key: `with_channel_multiple` (prune's `round_to: auto`) gets the recipe's runtimes' multiple."""
    resolve = getattr(spec.config, "with_channel_multiple", None)
    return spec if resolve is None else StageSpec(spec.name, resolve(multiple))


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
        raise as_recipe_error(err, stage.config, prefix=f"{path}.{name}") from None


def _check_resources(recipe: Recipe) -> None:
    """The recipe against what is on disk: the data, the model on the data's input size, the teachers' heads."""
    problem = resource_problem(recipe)
    if problem is not None:
        raise RecipeError(*problem)
