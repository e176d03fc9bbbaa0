"""Artifacts load back, in a fresh process, into a model with the same outputs and preprocessing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

from pipeline import load_artifact
from pipeline.core.artifacts import save_artifact
from pipeline.core.metrics import accuracy
from pipeline.core.models import ModelSpec, ModelState
from tests.conftest import PROJECT_ROOT, TINY_MODEL, stage_context


def _state(bundle) -> ModelState:
    spec = ModelSpec(TINY_MODEL, bundle.num_classes)
    torch.manual_seed(0)
    return ModelState(
        spec.build().eval(), spec, {"mean": bundle.mean, "std": bundle.std, "input_size": bundle.input_size}
    )


def _kind(kind: str, bundle) -> ModelState:
    """A model state whose deployable artifact is of `kind`, made by the stage that produces it."""
    from stages.inq import INQConfig, run_inq
    from stages.prune import PruneConfig, run_prune

    state = _state(bundle)
    ctx = stage_context(bundle, batch_size=8)
    if kind == "structured":
        state = run_prune(state, PruneConfig(pruning_ratio=0.5, epochs=0), ctx).state
    elif kind == "sparse":
        state = run_prune(state, PruneConfig(method="unstructured", pruning_ratio=0.7, epochs=0), ctx).state
    elif kind == "inq":
        state = run_inq(state, INQConfig(bits=4, epochs=0), ctx).state
    return state


@pytest.mark.parametrize("kind", ["dense", "structured", "sparse", "inq"])
def test_every_artifact_kind_round_trips_in_a_fresh_process(kind, tiny_bundle, tmp_path):
    state = _kind(kind, tiny_bundle)
    path = tmp_path / "model.pt"
    size = save_artifact(state, path)
    assert size == path.stat().st_size > 0
    x = torch.randn(2, *tiny_bundle.input_size)
    torch.save(x, tmp_path / "x.pt")
    with torch.inference_mode():
        expected = state.model.eval()(x)
    code = (f"import torch; from pipeline import load_artifact; m = load_artifact({str(path)!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r}); "
            "print(m.pretrained_cfg['input_size'], m.pretrained_cfg['architecture'])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)
    assert f"{tuple(tiny_bundle.input_size)} {TINY_MODEL}" in out.stdout
    # The same accuracy, measured on the loaded module.
    loader = tiny_bundle.test_loader(8)
    assert accuracy(load_artifact(path), loader) == accuracy(state.model, loader)


def test_loaded_artifact_has_same_accuracy_and_preprocessing(tiny_bundle, tmp_path):
    state = _state(tiny_bundle)
    save_artifact(state, tmp_path / "a.pt")
    loaded = load_artifact(tmp_path / "a.pt")
    assert not loaded.training
    assert loaded.pretrained_cfg["mean"] == tiny_bundle.mean and loaded.pretrained_cfg["num_classes"] == 4
    loader = tiny_bundle.test_loader(8)
    assert accuracy(loaded, loader) == accuracy(state.model, loader)
    # Only tensors and plain data inside: loadable without unpickling code.
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    assert blob["format"] == "dense" and blob["model"]["name"] == TINY_MODEL


def test_non_artifacts_are_rejected(tmp_path):
    torch.save(timm.create_model(TINY_MODEL).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a pipeline artifact"):
        load_artifact(tmp_path / "plain.pt")


def test_unknown_format_is_named(tiny_bundle, tmp_path):
    state = _state(tiny_bundle)
    state.artifact_format = "zip-of-dreams"
    with pytest.raises(KeyError, match="unknown artifact format 'zip-of-dreams'; known: dense"):
        save_artifact(state, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_a_folder_holding_the_artifact_loads_like_the_file(tiny_bundle, tmp_path):
    """MLflow's download_artifacts(run, "model") gives the folder, not the file."""
    state = _state(tiny_bundle)
    save_artifact(state, tmp_path / "model" / "artifact.pt")
    x = torch.randn(2, *tiny_bundle.input_size)
    with torch.inference_mode():
        assert torch.equal(load_artifact(tmp_path / "model")(x), load_artifact(tmp_path / "model" / "artifact.pt")(x))
    with pytest.raises(FileNotFoundError, match="without an artifact.pt"):
        load_artifact(tmp_path)


def test_structure_is_an_ordered_record_and_unknown_changes_are_named(tiny_bundle, tmp_path):
    state = _kind("structured", tiny_bundle)
    save_artifact(state, tmp_path / "a.pt")
    blob = torch.load(tmp_path / "a.pt", weights_only=True)
    assert [c["kind"] for c in blob["structure"]] == ["prune_channels"] and "architecture" not in blob["payload"]
    blob["structure"].append({"kind": "hypernetwork", "args": {}})
    torch.save(blob, tmp_path / "b.pt")
    with pytest.raises(KeyError, match=r"structure\[1\]: unknown structural change 'hypernetwork'"):
        load_artifact(tmp_path / "b.pt")
    blob["version"] = 1
    torch.save(blob, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="written by an older version"):
        load_artifact(tmp_path / "c.pt")
