"""Recipes: YAML files validated in full before any compute.

schema     the recipe's fields (data, model, baseline, stages, a sweep's or a search's keys) and the chain it runs
loading    by name or path, YAML, overrides, then validation
checks     whole-recipe checks: stages, orderings, budget, precision, and `resources` (data, model, teacher on disk)
errors     `RecipeError`: one line naming the field path and what is allowed

Every problem becomes a `RecipeError` naming the field path (`stages[1].train.lr`) and what is allowed, so the CLI
can exit 2 with one line, before any MLflow run or file is created.
"""

from pipeline.recipe.checks import validate_recipe
from pipeline.recipe.errors import RecipeError
from pipeline.recipe.loading import RECIPES_DIR, apply_override_, load_recipe, resolve_recipe_path
from pipeline.recipe.schema import Budget, DistributedConfig, ExecutorConfig, Recipe, StageSpec

__all__ = [
    "RECIPES_DIR",
    "Budget",
    "DistributedConfig",
    "ExecutorConfig",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "apply_override_",
    "load_recipe",
    "resolve_recipe_path",
    "validate_recipe",
]
