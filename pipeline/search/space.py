"""What a search samples its trials from: the orderings of the recipe's stages (`search.orderings`) that can run."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from stages.base import chain_conflict

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe


def search_orderings(recipe: Recipe) -> list[tuple[str, ...]]:
    """The orderings a search samples from (`search.orderings`), those a stage cannot follow left out."""
    assert recipe.search is not None
    names = [s.name for s in recipe.stage_specs()]
    if isinstance(recipe.search.orderings, list):
        chosen = [tuple(o) for o in recipe.search.orderings]
    elif recipe.search.orderings == "permutations":
        chosen = list(itertools.permutations(names))
    else:
        sizes = range(1, len(names) + 1)
        chosen = [
            o for k in sizes for subset in itertools.combinations(names, k) for o in itertools.permutations(subset)
        ]
    return [o for o in dict.fromkeys(chosen) if chain_conflict(list(o)) is None]
