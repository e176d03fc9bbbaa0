"""Where `python -m pipeline export SOURCE` finds the artifact to export: a file, an MLflow run, or a recipe."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from pipeline.run.cache import ARTIFACT_FILE


class SourceError(ValueError):
    """The export source names no artifact (with what was tried)."""


def resolve_artifact(source: str, overrides: list[str], *, cache_dir: Path | None = None) -> Path:
    """The artifact file `source` names: an artifact file or a folder holding `artifact.pt` (as MLflow's
    `download_artifacts(run, "model")` gives it), an MLflow run id (its `model/artifact.pt`), or a recipe name
    or path whose chain has run (its final stage's artifact, from the stage cache)."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / ARTIFACT_FILE).is_file():
        return path / ARTIFACT_FILE
    if path.is_file() and path.suffix not in {".yaml", ".yml"}:
        return path
    if re.fullmatch(r"[0-9a-f]{32}", source):
        return _from_run(source)
    return _from_recipe(source, overrides, cache_dir)


def _from_run(run_id: str) -> Path:
    from pipeline.tracking import Tracker

    tracker = Tracker()
    try:
        return tracker.download_artifact(run_id, f"model/{ARTIFACT_FILE}", Path(tempfile.mkdtemp(prefix="export-")))
    except Exception as err:
        raise SourceError(f"MLflow run {run_id} in {tracker.uri} has no model/{ARTIFACT_FILE}: {err}") from None


def _from_recipe(source: str, overrides: list[str], cache_dir: Path | None) -> Path:
    from pipeline.recipe import RecipeError, load_recipe
    from pipeline.run.cache import StageCache
    from pipeline.run.keys import plan_chain
    from pipeline.run.runner import default_cache_dir

    try:
        recipe = load_recipe(source, overrides)
    except RecipeError as err:
        raise SourceError(f"{source!r} is no artifact file, MLflow run id or valid recipe: {err}") from None
    if recipe.is_sweep:
        raise SourceError(f"recipe {recipe.name!r} is a sweep: export one ordering's run id or artifact instead")
    final = plan_chain(recipe.as_chain())[-1]
    entry = StageCache(Path(cache_dir or default_cache_dir()) / "stages").get(final.key)
    if entry is None:
        raise SourceError(
            f"recipe {recipe.name!r} has not run with these settings (stage {final.index}, {final.name}, is not in "
            f"the cache): run it first with `make recipe={source}` or `python -m pipeline run {source}`"
        )
    return entry.artifact_path
