"""Every cache key in one place (pipeline.run.keys): a change of a stage's code retrains that stage and the stages
after it and reuses those before it; a change of the shared code retrains all; a change of the measuring code
measures again without retraining."""

from __future__ import annotations

import dataclasses
import logging

import pytest

import stages.base
from pipeline.recipe import validate_recipe
from pipeline.run import keys
from pipeline.run.keys import code_versions, evaluation_key, plan_chain
from pipeline.run.runner import Runner
from pipeline.tracking import NullTracker
from tests.conftest import tiny_recipe

THREE = [{"prune": {"epochs": 1}}, {"inq": {"epochs": 1}}, {"distill": {"epochs": 1}}]


def _bump(monkeypatch, stage: str) -> None:
    entry = stages.base.get_stage(stage)
    monkeypatch.setitem(stages.base._REGISTRY, stage, dataclasses.replace(entry, version=entry.version + 1))


def test_a_stage_version_changes_the_keys_of_that_stage_and_the_later_ones_only(monkeypatch, cifar_root):
    recipe = validate_recipe(tiny_recipe(stages=THREE))
    before = [s.key for s in plan_chain(recipe, "same data")]
    _bump(monkeypatch, "inq")
    after = [s.key for s in plan_chain(recipe, "same data")]
    assert after[:2] == before[:2]  # baseline, prune: reused
    assert all(a != b for a, b in zip(after[2:], before[2:], strict=True))  # inq and distill: trained again


def test_shared_code_versions_change_every_key_and_measuring_code_only_the_evaluation(monkeypatch, cifar_root):
    recipe = validate_recipe(tiny_recipe(stages=THREE))
    before, eval_before = [s.key for s in plan_chain(recipe, "same data")], evaluation_key(recipe)
    monkeypatch.setattr(keys, "TRAINING_VERSION", keys.TRAINING_VERSION + 1)
    assert all(a != b for a, b in zip([s.key for s in plan_chain(recipe, "same data")], before, strict=True))
    monkeypatch.undo()
    monkeypatch.setattr(keys, "EVALUATION_VERSION", keys.EVALUATION_VERSION + 1)
    assert [s.key for s in plan_chain(recipe, "same data")] == before and evaluation_key(recipe) != eval_before


@pytest.mark.slow
def test_a_changed_stage_is_trained_again_and_the_stages_before_it_reused(monkeypatch, tmp_path, caplog, cifar_root):
    """End to end: after prune's version goes up the next run reuses the baseline from the cache and trains prune
    again; each cached entry records the versions of the code that made it."""
    recipe = validate_recipe(tiny_recipe())  # baseline + prune
    first = Runner(recipe, cache_dir=tmp_path, tracker=NullTracker(), progress=False).run()
    assert [r.cached for r in first.results] == [False, False]
    entry = Runner(recipe, cache_dir=tmp_path, tracker=NullTracker()).cached(plan_chain(recipe)[1])
    assert entry.record["code"] == code_versions("prune")
    _bump(monkeypatch, "prune")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        second = Runner(recipe, cache_dir=tmp_path, tracker=NullTracker(), progress=False).run()
    assert [r.cached for r in second.results] == [True, False]
    assert "stage 1 (prune): running" in caplog.text
    assert second.results[1].key != first.results[1].key and second.results[0].key == first.results[0].key
