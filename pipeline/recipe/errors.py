"""Recipe errors: one line naming the field path (`stages[1].train.lr`) and what is allowed, so the CLI can exit 2
before any MLflow run or file is created; and pydantic's validation errors turned into that line."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.core.config import ConfigError

RecipeError = ConfigError
"""A recipe problem: `path` is the field (e.g. 'data.batch_size'), `message` what is wrong and allowed."""


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


def as_recipe_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> RecipeError:
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
