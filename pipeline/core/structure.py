"""How a model's structure differs from a fresh timm build: an ordered record of structural changes.

A stage that changes structure (removes channels, factorises a layer, inserts fake quantization)
appends one `StructuralChange` to `ModelState.structure` and registers, under the change's kind,
the function that replays it on a module. An artifact stores the record beside its weights; loading
builds the timm model, replays the changes in order, then the artifact's weight encoding fills in the
values. So the weight formats (dense, sparse, INQ-packed, int8) never re-encode what earlier stages
did, and a stage that adds modules is one file that composes with every other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Replay = Callable[[nn.Module, dict[str, Any]], nn.Module]
"""`replay(model, args) -> model`: redo one change on a module that has the structure from before it."""

_REPLAYS: dict[str, Replay] = {}


@dataclass(frozen=True)
class StructuralChange:
    """One change of structure: `kind` names its registered replay, `args` are plain data (ints, strings,
    lists, dicts of them), because artifacts are read with `torch.load(weights_only=True)`."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": self.args}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuralChange:
        return cls(str(d["kind"]), dict(d.get("args", {})))


def register_structural_change(kind: str):
    """Register the function that replays changes of `kind` (a decorator)."""

    def wrap(fn: Replay) -> Replay:
        if kind in _REPLAYS:
            raise ValueError(f"structural change {kind!r} is registered twice")
        _REPLAYS[kind] = fn
        return fn

    return wrap


def replay_structure(model: nn.Module, changes: list[StructuralChange]) -> nn.Module:
    """`model` (a fresh build) with every change replayed in order; parameter values are placeholders."""
    for index, change in enumerate(changes):
        if change.kind not in _REPLAYS:
            known = ", ".join(sorted(_REPLAYS)) or "none"
            raise KeyError(
                f"structure[{index}]: unknown structural change {change.kind!r} (known: {known}); the stage that "
                "made it is not installed here (a plug-in stage is loaded through PIPELINE_PLUGINS)"
            )
        model = _REPLAYS[change.kind](model, change.args)
    return model


# --- layouts: the plain attributes and tensor shapes of a model, and how two of them differ ----------

_PLAIN = (int, float, bool, str)


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_")
        and k != "training"
        and (isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)))
    }


@dataclass(frozen=True)
class Layout:
    """Each module's plain attributes (channel counts, head counts…) and each state tensor's shape."""

    attributes: dict[str, dict[str, Any]]
    shapes: dict[str, list[int]]


def layout(model: nn.Module) -> Layout:
    attributes = {name: _plain_attrs(module) for name, module in model.named_modules()}
    return Layout(attributes, {k: list(v.shape) for k, v in model.state_dict().items()})


def resize_args(before: Layout, model: nn.Module) -> dict[str, Any]:
    """The attributes and shapes in which `model` differs from `before`: the args of a resize change.

    Only for changes that resize modules in place (structured pruning); a module or tensor that did not
    exist before cannot be described this way.
    """
    after = layout(model)
    new = sorted(set(after.attributes) - set(before.attributes)) + sorted(set(after.shapes) - set(before.shapes))
    if new:
        raise ValueError(f"{', '.join(new[:4])} did not exist before: a resize cannot describe added modules")
    attributes = {}
    for name, attrs in after.attributes.items():
        changed = {k: v for k, v in attrs.items() if before.attributes[name].get(k) != v}
        if changed:
            attributes[name] = changed
    shapes = {k: shape for k, shape in after.shapes.items() if before.shapes[k] != shape}
    return {"attributes": attributes, "shapes": shapes}


def resize_(model: nn.Module, args: dict[str, Any]) -> nn.Module:
    """Set the recorded attributes and give the recorded tensors their new shapes.

    The new tensors hold zeros, not uninitialised memory: a replayed structure may run before its values
    load (int8 conversion observes the weights), and garbage can be NaN.
    """
    modules = dict(model.named_modules())
    for name, attrs in args["attributes"].items():
        for key, value in attrs.items():
            setattr(modules[name], key, tuple(value) if isinstance(value, list) else value)
    for key, shape in args["shapes"].items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules[owner_name]
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(torch.zeros(shape, dtype=old.dtype), old.requires_grad)
        else:
            owner._buffers[leaf] = torch.zeros(shape, dtype=owner._buffers[leaf].dtype)
    return model
