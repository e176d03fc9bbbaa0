"""Recipes inherit: `extends:` a shipped recipe's name or a file beside the recipe, deep-merged with the child's keys
winning; a cycle, a missing parent or an unknown key in either is refused at load with the field path."""

from __future__ import annotations

import pytest
import yaml

from pipeline.recipe import RECIPES_DIR, RecipeError, load_recipe
from tests.conftest import run_cli, tiny_recipe


def _write(path, mapping):
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def test_a_two_level_chain_merges_with_the_child_winning(tmp_path, cifar_root):
    base = tiny_recipe(stages=[{"prune": {"pruning_ratio": 0.3, "epochs": 1}}])
    _write(tmp_path / "base.yaml", base)
    _write(tmp_path / "middle.yaml", {"extends": "base", "name": "middle", "baseline": {"epochs": 3},
                                      "data": {"train_subset": 200}})  # fmt: skip
    _write(tmp_path / "child.yaml", {"extends": "middle.yaml", "name": "child",
                                     "stages": [{"distill": {"epochs": 1}}]})  # fmt: skip
    recipe = load_recipe(tmp_path / "child.yaml", ["baseline.lr=0.01"])
    assert recipe.name == "child" and [s.name for s in recipe.stage_specs()] == ["distill"]  # lists: replaced
    assert recipe.baseline.epochs == 3 and recipe.baseline.lr == 0.01  # mappings: merged key by key
    assert recipe.data.train_subset == 200 and recipe.data.val_subset == base["data"]["val_subset"]
    assert "extends" not in recipe.to_dict()  # what runs, and what MLflow's recipe.yaml shows, is the merged recipe


def test_shipped_recipes_extend_the_shared_baseline():
    assert "extends: baseline" in (RECIPES_DIR / "prune-inq-distill.yaml").read_text()
    assert load_recipe("prune-inq-distill").baseline == load_recipe("baseline").baseline


@pytest.mark.parametrize(
    "files,expected",
    [
        (
            {"a": {"extends": "b"}, "b": {"extends": "a"}},
            r"^extends: recipes extend each other in a cycle: a.yaml -> "
            r"b.yaml -> a.yaml",
        ),
        ({"a": {"extends": "nowhere"}}, r"^extends: a.yaml extends 'nowhere', which is neither a file beside it nor"),
        ({"a": {"extends": ["b"]}}, r"^extends: must name a recipe"),
        (
            {"a": {"extends": "b", "name": "a"}, "b": {"baseline": {"epocs": 2}}},
            r"^baseline.epocs: unknown key; allowed: epochs",
        ),
    ],
    ids=["cycle", "missing parent", "not a name", "unknown key in the parent"],
)
def test_bad_inheritance_is_refused_at_load_with_the_field_path(tmp_path, cifar_root, files, expected):
    for name, mapping in files.items():
        content = mapping if "baseline" not in mapping else {**tiny_recipe(), **mapping,
                                                              "baseline": {**mapping["baseline"]}}  # fmt: skip
        _write(tmp_path / f"{name}.yaml", content)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(tmp_path / "a.yaml")


def test_validate_shows_the_merged_recipe(tmp_path, isolated, cifar_root):
    _write(tmp_path / "child.yaml", {"extends": "baseline", "name": "child", "stages": [{"qat": {"epochs": 1}}]})
    done = run_cli(["validate", str(tmp_path / "child.yaml"), "data.train_subset=100"], isolated)
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout.split("\n", 1)[1])
    assert shown["name"] == "child" and shown["model"]["name"] == "resnet10t" and shown["data"]["train_subset"] == 100
    assert shown["stages"][0]["qat"]["epochs"] == 1 and "extends" not in shown
