"""Which orderings a sweep runs: `orderings: all` (every permutation of the stages), a list, the recipe's own chain
(seeds or a control alone), plus each stage alone (`include_singles`), minus those a stage cannot follow; and the
checks of a sweep's `orderings:` when the recipe loads."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from pipeline.core.config import ConfigError as RecipeError
from stages.base import chain_conflict

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe


def check_sweep(recipe: Recipe) -> None:
    """Orderings name the recipe's stages, each once; explicit orderings must be runnable as written."""
    check_unique_stage_names(recipe, "a sweep")
    names = [s.name for s in recipe.stage_specs()]
    if isinstance(recipe.orderings, list):
        check_orderings(recipe.orderings, names, "orderings")
    elif not names:
        raise RecipeError("stages", "a sweep needs at least one stage to order")


def check_unique_stage_names(recipe: Recipe, what: str) -> None:
    names = [s.name for s in recipe.stage_specs()]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise RecipeError(
                f"stages[{index}]", f"{what} names stages by name, so each may appear once; {name!r} repeats"
            )


def check_orderings(orderings: list[list[str]], names: list[str], path: str) -> None:
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


def sweep_orderings(recipe: Recipe) -> tuple[list[tuple[str, ...]], list[tuple[tuple[str, ...], str]]]:
    """(orderings to run, [(ordering, reason)] skipped): `all` (also when unset) is every permutation of
    the stages minus those a stage cannot follow (e.g. pruning after qat); singles are added last."""
    names = [s.name for s in recipe.stage_specs()]
    if recipe.orderings is None and (recipe.seeds is not None or recipe.control) and not recipe.include_singles:
        chosen = [names]  # seeds or a control alone: the recipe's own chain
    elif isinstance(recipe.orderings, list):
        chosen = recipe.orderings
    else:
        chosen = itertools.permutations(names)
    ordered: dict[tuple[str, ...], None] = dict.fromkeys(tuple(o) for o in chosen)
    if recipe.include_singles:
        ordered.update(dict.fromkeys((n,) for n in names))
    runnable, skipped = [], []
    for ordering in ordered:
        conflict = chain_conflict(list(ordering))
        if conflict is None:
            runnable.append(ordering)
        else:
            skipped.append((ordering, conflict[1]))
    return runnable, skipped
