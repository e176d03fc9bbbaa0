"""Deployable artifacts: what a user ships, written as one file, and read back into a runnable module.

An artifact is two independent parts: how to rebuild the structure (the timm model spec plus the
ordered structural changes of `pipeline.core.structure`) and how the weights are encoded (a format:
dense, sparse, INQ-packed, int8). Each format registers a writer and a reader; stages name the
format of their output (`ModelState.artifact_format`). A format's reader receives the model with its
structure already replayed, so it only decodes values. Every artifact records the preprocessing it
expects, exposed on the loaded module as `pretrained_cfg` (timm's convention).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.models import ModelSpec, ModelState
from pipeline.core.structure import StructuralChange, replay_structure

ARTIFACT_VERSION = 2
"""2: the structure is an ordered record of changes (1 stored a per-format attribute delta)."""


@dataclass(frozen=True)
class ArtifactFormat:
    """`encode(state) -> payload` (tensors and plain data only); `decode(payload, model) -> model`, where
    `model` already has the artifact's structure (placeholder values)."""

    name: str
    encode: Callable[[ModelState], dict[str, Any]]
    decode: Callable[[dict[str, Any], nn.Module | None], nn.Module]
    version: int = 1  # of the encoding, in every stage cache key: bumped when `encode` writes something else
    # Whether a payload carries its own graph (a serialized program): then it is decoded without building the timm
    # model and replaying the structure (`decode` gets None for the model).
    standalone: Callable[[dict[str, Any]], bool] = lambda _payload: False


_FORMATS: dict[str, ArtifactFormat] = {}


def register_artifact_format(
    name: str, *, version: int = 1, standalone: Callable[[dict[str, Any]], bool] | None = None
):
    """Register a format from a class with static `encode` and `decode` methods; `version` of its encoding (bump it
    when a change of `encode` changes the file it writes: the cached artifacts are then written again); `standalone`:
    whether a payload holds its own graph, so loading it needs no replayed structure."""

    def wrap(cls):
        _FORMATS[name] = ArtifactFormat(name, cls.encode, cls.decode, version, standalone or (lambda _payload: False))
        return cls

    return wrap


def artifact_format_versions() -> dict[str, int]:
    """Every registered format's version."""
    return {name: fmt.version for name, fmt in sorted(_FORMATS.items())}


def artifact_format(name: str) -> ArtifactFormat:
    if name not in _FORMATS:
        raise KeyError(
            f"unknown artifact format {name!r}; known: {', '.join(sorted(_FORMATS))} (formats are registered by the "
            "stages that write them: `pipeline.load_artifact` imports the built-in ones and PIPELINE_PLUGINS)"
        )
    return _FORMATS[name]


@register_artifact_format("dense")
class DenseFP32:
    """The plain fp32 state_dict of the (possibly physically smaller) model."""

    @staticmethod
    def encode(state: ModelState) -> dict[str, Any]:
        return {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state.model.state_dict().items()}}

    @staticmethod
    def decode(payload: dict[str, Any], model: nn.Module) -> nn.Module:
        model.load_state_dict(payload["state_dict"], strict=True)
        return model


def save_artifact(state: ModelState, path: Path) -> int:
    """Write `state`'s deployable artifact to `path` atomically; returns its size in bytes."""
    fmt = artifact_format(state.artifact_format)
    blob = {
        "format": fmt.name,
        "version": ARTIFACT_VERSION,
        "model": state.spec.to_dict(),
        "pretrained_cfg": dict(state.preprocessing),
        "structure": [change.to_dict() for change in state.structure],
        "payload": fmt.encode(state),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


ARTIFACT_FILE = "artifact.pt"
"""The artifact's file name inside a folder (a cache entry, MLflow's downloaded `model` artifact)."""


def load_artifact(path: str | Path) -> nn.Module:
    """Turn an artifact back into a runnable module in eval mode, with the formats and structural changes registered
    so far (`pipeline.load_artifact`, the public API, registers the stages' first).

    `path` is the artifact file or a folder holding one `artifact.pt` (what MLflow's
    `download_artifacts(run_id, "model")` returns). Loads with `weights_only=True`: an artifact holds
    tensors and plain data, never code. The module's `pretrained_cfg` says which input it expects
    (mean, std, input_size).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ARTIFACT_FILE).is_file():
            raise FileNotFoundError(f"{path} is a folder without an {ARTIFACT_FILE}")
        path = path / ARTIFACT_FILE
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "format" not in blob or "payload" not in blob:
        raise ValueError(f"{path} is not a pipeline artifact")
    version = blob.get("version", 0)
    if version > ARTIFACT_VERSION:
        raise ValueError(f"{path}: artifact version {version} is newer than this tool ({ARTIFACT_VERSION})")
    if version < ARTIFACT_VERSION:
        raise ValueError(
            f"{path}: artifact version {version} was written by an older version of this tool, which recorded "
            "structure differently; rerun the recipe (or `python -m pipeline export`) to write it again"
        )
    spec = ModelSpec.from_dict(blob["model"])
    fmt, payload = artifact_format(blob["format"]), blob["payload"]
    if fmt.standalone(payload):
        model = fmt.decode(payload, None)
    else:
        structure = [StructuralChange.from_dict(d) for d in blob["structure"]]
        model = fmt.decode(payload, replay_structure(spec.build(), structure))
    model.pretrained_cfg = {
        **getattr(model, "pretrained_cfg", {}),
        **blob["pretrained_cfg"],
        "num_classes": spec.num_classes,
        "architecture": spec.name,
    }
    return model.eval()
