"""Deployable artifacts: what a user ships, written as one file, and read back into a runnable module.

Each format registers a writer and a reader. Stages name the format of their output
(`ModelState.artifact_format`); later stages add their own (sparse, INQ-packed, int8).
Every artifact records the preprocessing it expects, exposed on the loaded module as
`pretrained_cfg` (timm's convention).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models import ModelSpec, ModelState

ARTIFACT_VERSION = 1


@dataclass(frozen=True)
class ArtifactFormat:
    """`encode(state) -> payload` (tensors and plain data only); `decode(payload, model) -> model`."""

    name: str
    encode: Callable[[ModelState], dict[str, Any]]
    decode: Callable[[dict[str, Any], nn.Module], nn.Module]


_FORMATS: dict[str, ArtifactFormat] = {}


def register_artifact_format(name: str):
    """Register a format from a class with static `encode` and `decode` methods."""

    def wrap(cls):
        _FORMATS[name] = ArtifactFormat(name, cls.encode, cls.decode)
        return cls

    return wrap


def artifact_format(name: str) -> ArtifactFormat:
    if name not in _FORMATS:
        raise KeyError(f"unknown artifact format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


_PLAIN = (int, float, bool, str)


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_")
        and k != "training"
        and (isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)))
    }


def architecture_delta(state: ModelState) -> dict[str, dict[str, Any]]:
    """Plain attributes (channel counts, head counts…) where the model differs from a fresh `spec.build()`.

    Structured pruning shrinks layers in place; recording only these ints and tuples lets a fresh
    process rebuild the smaller architecture from timm without unpickling any code.
    """
    reference = dict(state.spec.build().named_modules())
    delta = {}
    for name, module in state.model.named_modules():
        if name not in reference:
            raise ValueError(f"module {name!r} does not exist in a fresh {state.spec.name}: cannot describe it")
        ref = _plain_attrs(reference[name])
        changed = {k: v for k, v in _plain_attrs(module).items() if ref.get(k) != v}
        if changed:
            delta[name] = changed
    return delta


def apply_architecture_(model: nn.Module, delta: dict[str, dict[str, Any]], state_dict: dict[str, torch.Tensor]):
    """Reshape a freshly built model in place so that `state_dict` (of a pruned model) loads strictly."""
    modules = dict(model.named_modules())
    for name, attrs in delta.items():
        for key, value in attrs.items():
            setattr(modules[name], key, value)
    for key, tensor in state_dict.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules[owner_name]
        if leaf in owner._parameters and owner._parameters[leaf].shape != tensor.shape:
            owner._parameters[leaf] = nn.Parameter(torch.empty_like(tensor))
        elif leaf in owner._buffers and owner._buffers[leaf] is not None and owner._buffers[leaf].shape != tensor.shape:
            owner._buffers[leaf] = torch.empty_like(tensor)
    model.load_state_dict(state_dict, strict=True)
    return model


@register_artifact_format("dense")
class DenseFP32:
    """The plain fp32 state_dict of the (possibly physically smaller) model."""

    @staticmethod
    def encode(state: ModelState) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.model.state_dict().items()},
            "architecture": architecture_delta(state),
        }

    @staticmethod
    def decode(payload: dict[str, Any], model: nn.Module) -> nn.Module:
        return apply_architecture_(model, payload.get("architecture", {}), payload["state_dict"])


def save_artifact(state: ModelState, path: Path) -> int:
    """Write `state`'s deployable artifact to `path` atomically; returns its size in bytes."""
    fmt = artifact_format(state.artifact_format)
    blob = {
        "format": fmt.name,
        "version": ARTIFACT_VERSION,
        "model": state.spec.to_dict(),
        "pretrained_cfg": dict(state.preprocessing),
        "payload": fmt.encode(state),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def load_artifact(path: str | Path) -> nn.Module:
    """Turn any stage's artifact back into a runnable module in eval mode (public API).

    Loads with `weights_only=True`: an artifact holds tensors and plain data, never code.
    The module's `pretrained_cfg` says which input it expects (mean, std, input_size).
    """
    import stages  # noqa: F401  (stages register their artifact formats)

    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "format" not in blob or "payload" not in blob:
        raise ValueError(f"{path} is not a pipeline artifact")
    if blob.get("version", 0) > ARTIFACT_VERSION:
        raise ValueError(f"{path}: artifact version {blob['version']} is newer than this tool ({ARTIFACT_VERSION})")
    spec = ModelSpec.from_dict(blob["model"])
    model = artifact_format(blob["format"]).decode(blob["payload"], spec.build())
    model.pretrained_cfg = {
        **getattr(model, "pretrained_cfg", {}),
        **blob["pretrained_cfg"],
        "num_classes": spec.num_classes,
        "architecture": spec.name,
    }
    return model.eval()
