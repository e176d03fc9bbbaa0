"""The `search:` block checked against the recipe that holds it, when the recipe loads: its orderings, space,
trials to start with, objectives and constraints (validation metrics only: a test metric is refused with the
validation name to use instead)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.core.config import ConfigError as RecipeError
from pipeline.core.metrics import metric_catalogue, validation_name
from pipeline.search.config import ORDERING_PARAM, is_integer_field
from pipeline.search.space import search_orderings
from pipeline.sweep.orderings import check_orderings, check_unique_stage_names

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe, StageSpec


def check_search(recipe: Recipe) -> None:
    """The search's orderings, space, objectives and constraints against the recipe's stages and measured metrics."""
    assert recipe.search is not None
    search = recipe.search
    for key in ("orderings", "seeds", "control"):
        if getattr(recipe, key) not in (None, False) or (key == "orderings" and recipe.include_singles):
            raise RecipeError(key, "a search chooses its chains itself: use `search.orderings`, or run the sweep apart")
    check_unique_stage_names(recipe, "a search")
    names = [s.name for s in recipe.stage_specs()]
    if not names:
        raise RecipeError("stages", "a search needs at least one stage to order")
    if isinstance(search.orderings, list):
        check_orderings(search.orderings, names, "search.orderings")
    if not search_orderings(recipe):
        raise RecipeError("search.orderings", "no ordering can run: every one has a stage that cannot follow another")
    specs = {s.name: s for s in recipe.stage_specs()}
    for key, values in search.space.items():
        _check_search_field(recipe, specs, key, values.endpoints())
    for index, entry in enumerate(search.start_with):
        _check_start_with(recipe, f"search.start_with[{index}]", entry)
    if isinstance(search.pruner.peers, list):
        for index, key in enumerate(search.pruner.peers):
            if key != ORDERING_PARAM and key not in search.space:
                raise RecipeError(f"search.pruner.peers[{index}]", f"{key!r} is neither `ordering` nor a field of "
                                  f"search.space ({', '.join(search.space) or 'empty'})")  # fmt: skip
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
    allowed = [">".join(o) for o in search_orderings(recipe)]
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
