"""The stage cache: stable keys, atomic entries, metrics kept per evaluation setting."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.artifacts import save_artifact
from pipeline.core.models import ModelSpec, ModelState
from pipeline.run.cache import StageCache
from pipeline.run.keys import stage_key
from tests.conftest import TINY_MODEL


def _state() -> ModelState:
    spec = ModelSpec(TINY_MODEL, 3)
    return ModelState(spec.build(), spec, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 16, 16)})


def test_keys_depend_on_parent_name_and_config():
    base = stage_key("root", "train", {"epochs": 1, "lr": 0.1})
    assert base == stage_key("root", "train", {"lr": 0.1, "epochs": 1})  # key order does not matter
    assert base != stage_key("root", "train", {"epochs": 2, "lr": 0.1})
    assert base != stage_key("other", "train", {"epochs": 1, "lr": 0.1})
    assert base != stage_key("root", "prune", {"epochs": 1, "lr": 0.1})


def test_put_then_get_round_trips_state_and_artifact(tmp_path):
    cache = StageCache(tmp_path)
    assert cache.get("ab" * 32) is None
    state = _state()
    entry = cache.put("ab" * 32, state, {"stage": "train", "seconds": 1.5}, save_artifact)
    again = cache.get("ab" * 32)
    assert again is not None and again.record["seconds"] == 1.5 and again.record["status"] == "SUCCEEDED"
    loaded = again.load_state()
    for key, value in state.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert entry.artifact_path.stat().st_size > 0
    assert [p.name for p in (tmp_path / "ab").iterdir()] == ["ab" * 32]  # no temporary folders left


def test_a_crash_while_writing_leaves_no_entry(tmp_path):
    cache = StageCache(tmp_path)

    def broken_writer(state, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.put("cd" * 32, _state(), {}, broken_writer)
    assert cache.get("cd" * 32) is None
    assert list((tmp_path / "cd").iterdir()) == []


def test_metrics_are_stored_per_evaluation_key(tmp_path):
    entry = StageCache(tmp_path).put("ef" * 32, _state(), {}, save_artifact)
    entry.put_metrics("fast", {"top1": 50.0})
    assert entry.metrics("fast") == {"top1": 50.0}
    assert entry.metrics("thorough") is None


def test_a_forced_rerun_replaces_the_entry_and_its_metrics(tmp_path):
    cache = StageCache(tmp_path)
    first = cache.put("aa" * 32, _state(), {"seconds": 1.0}, save_artifact)
    first.put_metrics("eval", {"top1": 10.0})
    again = cache.put("aa" * 32, _state(), {"seconds": 2.0}, save_artifact)
    assert again.record["seconds"] == 2.0
    assert again.metrics("eval") is None  # old measurements went with the old entry
    assert [p.name for p in (tmp_path / "aa").iterdir()] == ["aa" * 32]
