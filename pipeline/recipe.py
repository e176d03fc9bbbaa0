"""Recipes: YAML files validated in full before any compute.

Every problem becomes a `RecipeError` naming the field path (`stages[1].train.lr`) and what is
allowed, so the CLI can exit 2 with one line, before any MLflow run or file is created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline.config import StrictConfig
from pipeline.data import DataConfig, DataNotFoundError, locate
from pipeline.evaluator import EvalConfig
from pipeline.models import ModelConfig
from pipeline.training import TrainConfig
from stages import get_stage
from stages.base import UnknownStageError

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


class Recipe(StrictConfig):
    """A whole recipe: data, model, baseline training, and the chain of compression stages."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100, description="recipe name")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed for model init, data order, augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    baseline: TrainConfig
    stages: list[Any] = Field(default_factory=list, description="ordered one-key mappings {stage: config}")
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    orderings: Any = Field(None, description="ordering sweeps (not yet supported)")

    @field_validator("orderings")
    @classmethod
    def _no_sweeps_yet(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("ordering sweeps are not yet supported (planned in issue #7); remove `orderings`")
        return value

    def stage_specs(self) -> list[StageSpec]:
        return list(self.stages)

    @property
    def ordering(self) -> str:
        """Stage names joined by '>', e.g. 'prune>inq>distill' ('train' for a baseline-only recipe)."""
        return ">".join(s.name for s in self.stage_specs()) or "train"

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude={"stages", "orderings"})
        out["stages"] = [s.to_dict() for s in self.stage_specs()]
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
    _check_resources(recipe)
    return recipe


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
    try:
        locate(recipe.data)
    except DataNotFoundError as err:
        raise RecipeError("data.root", str(err)) from None


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
