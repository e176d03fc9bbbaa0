"""Every key of the stage cache, in one place: what makes two stage outputs (or two measurements) the same.

A stage's key hashes its input's key, its name, its code's version and its resolved config; the root of every chain
hashes what the baseline starts from (model, data and its contents, seed, library versions, the shared code's
versions, the device's numerics). The evaluation key says how metrics were measured, so changed measuring code
measures cached models again without retraining them. A sweep's and a search's ids hash their chains with it.

Code versions: a change of code that changes what it computes must bump its declared version (a stage's `version=`
in `register_stage`, an artifact format's in `register_artifact_format`, TRAINING_VERSION, DATA_VERSION,
EVALUATION_VERSION); `tests/test_code_versions.py` fails when the source of one of them changed and its version was
not looked at. Declared versions rather than hashes of the source: a hash cannot see the code a stage calls, and
changes every key on a comment or a file move (every cached result retrained for nothing); a declared version
says what a person decided, and the test keeps that decision from being forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch

from pipeline import __version__
from pipeline.core.artifacts import artifact_format_versions
from pipeline.core.data import DATA_VERSION, EVAL_ONLY_FIELDS, NEUTRAL_FIELDS, locate, scan
from pipeline.core.hashing import digest, file_digest
from pipeline.core.metrics import EVALUATION_VERSION
from pipeline.core.precision import auto_context
from pipeline.core.training import TRAINING_VERSION
from pipeline.recipe import Recipe, StageSpec
from stages import get_stage


@dataclass(frozen=True)
class PlannedStage:
    """One step of the chain: index 0 is the baseline (`train`)."""

    index: int
    spec: StageSpec
    key: str

    @property
    def name(self) -> str:
        return self.spec.name


CACHE_FORMAT = 2
"""Part of every key; bumped when what a cached state holds changes (2: `ModelState.structure`)."""


def shared_code_versions() -> dict[str, Any]:
    """The versions of the code every stage's output depends on: the training loop, the data, the artifact formats."""
    return {"training": TRAINING_VERSION, "data": DATA_VERSION, "artifact_formats": artifact_format_versions()}


def code_versions(stage: str) -> dict[str, Any]:
    """What a cached entry records of the code that made it."""
    return {"stage": get_stage(stage).version, **shared_code_versions()}


def stage_key(parent_key: str, stage_name: str, config: dict[str, Any], version: int = 1) -> str:
    """Key of a stage output: its input's key, the stage's name, the version of its code and its resolved config."""
    return digest({"format": CACHE_FORMAT, "parent": parent_key, "stage": stage_name, "version": version,
                   "config": config})  # fmt: skip


def data_fingerprint(recipe: Recipe) -> str:
    """The fingerprint of the recipe's data (every file's path and contents): part of every key."""
    return scan(locate(recipe.data)).fingerprint


def plan_chain(
    recipe: Recipe, fingerprint: str | None = None, device: torch.device | None = None
) -> list[PlannedStage]:
    """The baseline plus the recipe's stages, each keyed by everything that determines its output: the versions of
    the code that computes it (`shared_code_versions`, each stage's own) and of the libraries, the seed, the model,
    the data settings that change training, the data's contents
    (`fingerprint`, computed from the data when not given), so a changed dataset is never served stale, and what
    `precision: auto` depends on where it trains (`device`, default: the recipe's)."""
    checkpoint = recipe.model.checkpoint
    root = digest(
        {
            "version": __version__,
            "code": shared_code_versions(),
            # The cache pickles whole modules: another torch or timm may not read them, or build them differently.
            "torch": torch.__version__,
            "timm": timm.__version__,
            "seed": recipe.seed,
            "model": recipe.model.model_dump(mode="json", exclude={"checkpoint"}),
            "checkpoint": file_digest(checkpoint.expanduser()) if checkpoint else None,
            "data": recipe.data.model_dump(mode="json", exclude=EVAL_ONLY_FIELDS | NEUTRAL_FIELDS),
            "data_fingerprint": fingerprint or data_fingerprint(recipe),
            # `precision: auto` trains in bf16 on one machine and fp32 on another (pipeline.core.precision).
            "numerics": auto_context(device or pick_device(recipe.device)),
        }
    )
    specs = [StageSpec("train", recipe.baseline), *recipe.stage_specs()]
    chain, parent = [], root
    for index, spec in enumerate(specs):
        if index == 1 and recipe.stage_seed is not None and recipe.stage_seed != recipe.seed:
            parent = digest({"parent": parent, "stage_seed": recipe.stage_seed})  # one baseline, seeded stages
        parent = stage_key(parent, spec.name, spec.config.model_dump(mode="json"), get_stage(spec.name).version)
        chain.append(PlannedStage(index, spec, parent))
    return chain


def evaluation_key(recipe: Recipe) -> str:
    """Identifies how metrics were measured; cached metrics are reused only under the same key. (Which images are
    evaluated beyond the subsets is fixed by the stage key: the data's fingerprint and its split settings.)"""
    return digest(
        {
            "evaluation": recipe.evaluation.model_dump(mode="json"),
            "deploy": recipe.deploy.model_dump(mode="json"),
            "data": recipe.data.model_dump(mode="json", include=EVAL_ONLY_FIELDS),
            "splits": 2,  # metrics and predictions of the validation and the test split
            "code": EVALUATION_VERSION,
        }
    )[:16]


def pick_device(name: str) -> torch.device:
    """'auto': CUDA when present, else the CPU; 'cuda' without a GPU is an error that says so."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")  # under torchrun, the rank's own GPU (`distributed.process_group` selects it)
    return torch.device("cpu")
