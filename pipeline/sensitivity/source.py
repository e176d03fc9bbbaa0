"""The model a sensitivity analysis starts from: a recipe's baseline, or the model entering one of its stages, taken
from the stage cache (the stages before it are run first, tracked as usual, when they are not cached yet)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.data import DataBundle, load_data
from pipeline.core.models import ModelState
from pipeline.recipe import Recipe
from pipeline.run.runner import Runner
from pipeline.sensitivity.config import SensitivityError
from pipeline.tracking import Tracker

log = logging.getLogger("pipeline")


def prefix_recipe(recipe: Recipe, stage: str | None) -> Recipe:
    """The chain up to (not including) `stage` (None: the baseline alone), with the stages' settings exactly as in
    the whole chain, so its cache keys are the whole chain's."""
    chain = recipe.as_chain()
    specs = chain.stage_specs()
    names = [s.name for s in specs]
    if stage is None:
        return chain.model_copy(update={"stages": []})
    if stage not in names:
        listed = ", ".join(names) or "none"
        raise SensitivityError(f"--stage {stage!r} is not in recipe {recipe.name!r}; its stages: {listed}")
    return chain.model_copy(update={"stages": specs[: names.index(stage)]})


def describe(recipe: Recipe, stage: str | None) -> str:
    if stage:
        return f"{recipe.name} (the model entering {stage})"
    return recipe.name if recipe.name == "baseline" else f"{recipe.name} (its baseline)"


def model_and_data(
    recipe: Recipe, stage: str | None, *, cache_dir: Path | None, tracker: Tracker | None, progress: bool
) -> tuple[ModelState, DataBundle, str]:
    """The model to analyse, the data, and the model's cache key; the chain before it is run if not cached."""
    runner = Runner(prefix_recipe(recipe, stage), cache_dir=cache_dir, tracker=tracker, progress=progress)
    last = runner.chain[-1]
    if not runner.cached(last):
        log.info("sensitivity: %s is not cached yet; running the chain up to it first", describe(recipe, stage))
        runner.run()
    state = runner.cache.get(last.key).load_state()
    if state.wrapper is not None:
        raise SensitivityError(
            f"sensitivity of a model that is already fake-quantized (entering {stage}, after qat) is not yet "
            "supported; analyse the model entering qat instead"
        )
    data = runner.data or load_data(runner.recipe.data, runner.recipe.model, index=runner.index,
                                    cache_dir=runner.cache_dir / "datasets")  # fmt: skip
    return state, data, last.key
