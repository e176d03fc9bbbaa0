"""Reading a recipe: by name (recipes/) or path, YAML, the recipes it `extends` (deep-merged, the child's keys
winning), overrides (`data.train_subset=2000`), then validation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.paths import PROJECT_ROOT
from pipeline.recipe.checks import validate_recipe
from pipeline.recipe.errors import RecipeError
from pipeline.recipe.schema import Recipe

RECIPES_DIR = PROJECT_ROOT / "recipes"


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
    """Read (with the recipes it `extends`), override and validate a recipe; raises RecipeError (one line) on any
    problem."""
    raw = read_raw(resolve_recipe_path(str(name_or_path)))
    for item in overrides:
        apply_override_(raw, item)
    return validate_recipe(raw)


def read_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe mapping at `path` merged over the recipe it `extends` (recursively): mappings are merged key by
    key, the child's values win, anything else (a list of stages, say) is replaced whole."""
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError("extends", f"must name a recipe (a shipped recipe's name or a path), got {parent!r}")
    where = f"{path.name} extends {parent!r}"
    parent_path = _parent_path(parent, path)
    if parent_path is None:
        raise RecipeError("extends", f"{where}, which is neither a file beside it nor a shipped recipe")
    if parent_path.resolve() in {p.resolve() for p in (*chain, path)}:
        cycle = " -> ".join(p.name for p in (*chain, path, parent_path))
        raise RecipeError("extends", f"recipes extend each other in a cycle: {cycle}")
    return merge(read_raw(parent_path, (*chain, path)), raw)


def merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` deep-merged over `base` (a new mapping; neither is changed)."""
    out = dict(base)
    for key, value in child.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parent_path(parent: str, child: Path) -> Path | None:
    """`extends:` resolves relative to the child's folder, then as a shipped recipe's name."""
    for candidate in (child.parent / parent, child.parent / f"{parent}.yaml", RECIPES_DIR / f"{parent}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError("", f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError("", f"{path} must hold a mapping of recipe keys, got {type(raw).__name__}")
    return raw


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
