"""Build timm models from a recipe, and the state that flows from stage to stage along a chain."""

from __future__ import annotations

import difflib
import logging
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import timm
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from pipeline.core.config import StrictConfig
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.structure import StructuralChange

log = logging.getLogger("pipeline")


class ModelConfig(StrictConfig):
    """Which timm model to build and where its starting weights come from."""

    name: str = Field(description="any timm model name, e.g. resnet10t, resnet18, mobilenetv3_small_100")
    pretrained: bool = Field(False, description="start from timm's pretrained weights (downloads; needs network)")
    checkpoint: Path | None = Field(
        None,
        description="local checkpoint to start from, read as timm's load_checkpoint reads it: a state_dict, or a "
        "training checkpoint with EMA weights (preferred), `state_dict` or `model`; `module.` prefixes dropped",
    )
    reset_classifier: Literal["auto"] | bool = Field(
        "auto",
        description="start the classifier from random weights instead of the checkpoint's: auto when the "
        "checkpoint's class count differs from the data's (said in the log); true always; false never (a "
        "mismatch is an error)",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
            hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
            raise ValueError(f"unknown timm model {name!r}{hint}")
        return name

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.expanduser().is_file():
            raise ValueError(f"checkpoint file not found: {path}")
        return path

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("set either pretrained: true or checkpoint:, not both")
        reserved = {"num_classes", "pretrained"} & set(self.kwargs)
        if reserved:
            raise ValueError(f"kwargs may not set {sorted(reserved)}: they come from the data and `pretrained`")
        return self


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture: timm name, class count, create_model kwargs."""

    name: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, pretrained: bool = False) -> nn.Module:
        return timm.create_model(self.name, pretrained=pretrained, num_classes=self.num_classes, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(d["name"], int(d["num_classes"]), dict(d.get("kwargs", {})))


@dataclass(frozen=True)
class PowerOfTwoGrid:
    """A parameter whose every weight is ±2^k (n2 <= k <= n1) or 0, with n2 = n1 + 1 - 2^(bits-1)/2: INQ's levels.
    Later stages read it: qat gives such layers power-of-two int8 scales, the `inq` artifact packs them in `bits`."""

    n1: int
    bits: int


class ModelWrapper(Protocol):
    """A form of the model that wraps its float weights in another graph (qat's fake quantization). A stage that
    must work on the float weights (pruning) unwraps the state, changes the float model, and wraps it again, through
    this interface alone: it never needs to know which stage wrapped it."""

    def float_model(self, state: ModelState) -> nn.Module:
        """The float model under the wrapper (its parameters are the wrapped graph's)."""
        ...

    def unwrap_(self, state: ModelState) -> None:
        """Make `state` the float model again (model, fixed weights, grids, structure, artifact format)."""
        ...

    def rewrap_(self, state: ModelState, ctx: Any, *, training: bool) -> None:
        """Wrap the (changed) float model again as it was wrapped before, ready for `training` (or evaluation)."""
        ...


@dataclass
class ModelState:
    """What one stage hands to the next.

    `fixed` holds the weights later training must keep; `structure` records, in order, how the model's
    structure differs from `spec.build()` (see pipeline.core.structure); `artifact_format` names how the
    weights are encoded when shipped (see pipeline.core.artifacts); `preprocessing` is the input the model
    expects (timm's pretrained_cfg keys: mean, std, input_size). Two typed records hand stages' results on:
    `pow2_grids` (parameter name -> its power-of-two level set, INQ's) and `wrapper` (set while the model is
    wrapped, e.g. fake-quantized, with how to get at the float weights: `ModelWrapper`).
    """

    model: nn.Module
    spec: ModelSpec
    preprocessing: dict[str, Any]
    fixed: FixedWeights = field(default_factory=FixedWeights)
    structure: list[StructuralChange] = field(default_factory=list)
    artifact_format: str = "dense"
    pow2_grids: dict[str, PowerOfTwoGrid] = field(default_factory=dict)
    wrapper: ModelWrapper | None = None

    def rename_parameters_(self, names: dict[str, str]) -> None:
        """Parameters renamed (`old -> new`, e.g. by a graph transform): fixed weights and grids follow them."""
        state = self.fixed.state_dict()
        self.fixed = FixedWeights.from_state_dict({k: {names.get(n, n): t for n, t in v.items()} for k, v in
                                                   state.items()})  # fmt: skip
        self.pow2_grids = {names.get(n, n): grid for n, grid in self.pow2_grids.items()}


class ModelSourceError(RuntimeError):
    """The model's starting weights cannot be had: pretrained weights offline, or a checkpoint that does not fit."""


class PretrainedUnavailableError(ModelSourceError):
    """timm's pretrained weights could not be fetched (typically: no network)."""


def create_model(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, ModelSpec]:
    """Build the recipe's model with its starting weights (random, timm pretrained, or a checkpoint)."""
    spec = ModelSpec(cfg.name, num_classes, dict(cfg.kwargs))
    if cfg.pretrained:
        check_hub_reachable(cfg.name)
        try:
            model = spec.build(pretrained=True)  # timm drops a classifier of another class count itself
        except Exception as err:  # hub errors come as many types (OSError, HTTPError, LocalEntryNotFound…)
            raise PretrainedUnavailableError(
                f"model.pretrained: could not fetch pretrained weights for {cfg.name!r} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
                "offline, set pretrained: false or give a checkpoint:"
            ) from err
    else:
        model = spec.build()
    if cfg.checkpoint is not None:
        load_checkpoint_(model, cfg.checkpoint, reset_classifier=cfg.reset_classifier)
    return model, spec


def check_hub_reachable(name: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, not after the hub client's retries, when the weights' host cannot be reached.

    Skipped when HF_HUB_OFFLINE is set: then the hub client reads its local cache directly.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return
    if os.environ.get("HF_ENDPOINT") or urllib.request.getproxies():
        return  # a mirror or a proxy: only the hub client knows how to reach it
    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None:
        raise PretrainedUnavailableError(f"model.pretrained: timm has no pretrained weights for {name!r}")
    host = "huggingface.co" if pcfg.hf_hub_id else urllib.parse.urlparse(pcfg.url or "").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as err:
        raise PretrainedUnavailableError(
            f"model.pretrained: cannot reach {host} for {name!r} weights ({err}); offline, set pretrained: false, "
            "give a checkpoint:, or set HF_HUB_OFFLINE=1 if the weights are in the local Hugging Face cache"
        ) from None


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a local checkpoint, as timm's `load_checkpoint` finds it: EMA weights when present
    (`state_dict_ema`, `model_ema`), else `state_dict` or `model`, else the file itself; `module.` (DDP) and
    `_orig_mod.` (torch.compile) prefixes removed. Read with weights_only: a checkpoint holds tensors, never code."""
    try:
        return timm.models.load_state_dict(str(Path(path).expanduser()), use_ema=True, weights_only=True)
    except (RuntimeError, OSError, ValueError) as err:
        raise ModelSourceError(f"model.checkpoint: cannot read {path}: {str(err).splitlines()[0][:300]}") from None


def classifier_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of the model's classifier (timm's `pretrained_cfg['classifier']`, e.g. `fc`, `head.fc`)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or []
    prefixes = [names] if isinstance(names, str) else list(names)
    return [k for k in model.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes)]


def load_checkpoint_(model: nn.Module, path: Path, *, reset_classifier: str | bool = "auto") -> list[str]:
    """Load a local checkpoint into `model`; returns the classifier keys left at their random start (see
    ModelConfig.reset_classifier). Every other key must match by name and shape."""
    state = read_checkpoint(path)
    own = model.state_dict()
    head = classifier_keys(model)
    mismatched = [k for k in head if k in state and state[k].shape != own[k].shape]
    if reset_classifier is True or (reset_classifier == "auto" and mismatched):
        if mismatched:
            theirs, ours = state[mismatched[0]].shape[0], own[mismatched[0]].shape[0]
            log.info("model.checkpoint: its classifier has %d classes, the data %d: the classifier starts from "
                     "random weights (model.reset_classifier)", theirs, ours)  # fmt: skip
        state = {k: v for k, v in state.items() if k not in head}
        reset = head
    elif mismatched:
        raise ModelSourceError(
            f"model.checkpoint: {path} has a classifier for {state[mismatched[0]].shape[0]} classes, the data has "
            f"{own[mismatched[0]].shape[0]}; set model.reset_classifier: true (or auto) to train a new one"
        )
    else:
        reset = []
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in reset]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        shown = f"shapes differ {shapes[:3]}, " if shapes else ""
        raise ModelSourceError(
            f"model.checkpoint: {path} does not fit the model: {shown}missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    model.load_state_dict(state, strict=False)
    return reset
