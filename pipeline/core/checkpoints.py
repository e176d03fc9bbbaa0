"""Checkpoints inside a stage: a killed run resumes the stage it was training where it stopped, not from its start.

A stage trains through one or more `StageContext.fit` calls (INQ one per portion, pruning one per step, the baseline
one). While it runs, its work folder in the stage cache holds, for fit call k:

    fit-<k>.pt           a finished call: the model's state after it, the random generators' states, its report
    fit-<k>.progress.pt  the call in progress: model, optimizer, LR schedule, gradient scaler, random generators and
                         the training loader's state, its position (epoch, batch) and the epoch's running sums,
                         written after every `every_epochs` epochs and every `every_minutes` minutes

A rerun runs the stage function again from its input: a finished call trains nothing (the model takes the state it
ended with, the generators theirs, and the epoch hooks replay its recorded epochs), and the call in progress goes on
from its position. The stage therefore ends as an uninterrupted run would, bit for bit on the CPU in fp32 (tested),
as long as the stage's own code between fit calls depends only on the model, its seed and its own generators, as every
stage here does. The folder is removed once the stage's output is in the cache. Only rank 0 writes; under torchrun
every rank reads the same files, so they need a filesystem the ranks share (one machine, or a shared cache folder).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from pipeline.core.config import StrictConfig

log = logging.getLogger("pipeline")


class CheckpointConfig(StrictConfig):
    """When a training stage writes a checkpoint (a run setting: it never changes what a stage computes, so it is
    part of no cache key)."""

    every_epochs: int = Field(1, ge=0, le=10_000, description="write one after every N completed epochs (0: never)")
    every_minutes: float | None = Field(
        None,
        gt=0,
        description="also write one every N minutes of training, inside an epoch (long epochs of large data or "
        "models); unset: only at epoch ends",
    )


def rng_state() -> dict[str, Any]:
    """The states of every random generator training draws from outside its loader: torch (CPU and CUDA), Python's
    `random`, numpy's global."""
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` returned."""
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    # Our own file (it holds Python's and numpy's generator states, hence weights_only=False), never a download.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a file from another torch, or a torn disk: start the call again, loudly
        log.warning("checkpoint %s cannot be read (%s); that training starts again", path, err)
        return None


@dataclass
class FitCheckpoint:
    """The checkpoint files of one fit call (`call`, counted from 0 within the stage)."""

    folder: Path
    call: int
    config: CheckpointConfig
    write: bool = True
    resumed: list[str] = field(default_factory=list)  # shared with the stage's StageCheckpoints
    _last_write: float = field(default_factory=time.monotonic)

    @property
    def finished_path(self) -> Path:
        return self.folder / f"fit-{self.call}.pt"

    @property
    def progress_path(self) -> Path:
        return self.folder / f"fit-{self.call}.progress.pt"

    def finished(self) -> dict[str, Any] | None:
        """What a finished call left (model state, generator states, report), or None."""
        return _load(self.finished_path)

    def progress(self) -> dict[str, Any] | None:
        """The call's last checkpoint while it trained, or None."""
        return _load(self.progress_path)

    def epoch_due(self, epochs_done: int) -> bool:
        return self.config.every_epochs > 0 and epochs_done % self.config.every_epochs == 0

    def time_due(self) -> bool:
        minutes = self.config.every_minutes
        return minutes is not None and time.monotonic() - self._last_write >= 60 * minutes

    def save_progress(self, payload: dict[str, Any]) -> None:
        self._last_write = time.monotonic()
        if self.write:
            self.folder.mkdir(parents=True, exist_ok=True)
            _save_atomic(payload, self.progress_path)

    def save_finished(self, payload: dict[str, Any]) -> None:
        """Record the finished call; its progress checkpoint is no longer needed."""
        if self.write:
            self.folder.mkdir(parents=True, exist_ok=True)
            _save_atomic(payload, self.finished_path)
            self.progress_path.unlink(missing_ok=True)

    def note_resumed(self, where: str) -> None:
        self.resumed.append(where)


@dataclass
class StageCheckpoints:
    """The checkpoints of one stage run, in `folder` (its cache entry's work folder): hands each fit call its own."""

    folder: Path
    config: CheckpointConfig = field(default_factory=CheckpointConfig)
    write: bool = True
    resumed: list[str] = field(default_factory=list)
    _calls: int = 0

    def next_fit(self) -> FitCheckpoint:
        """The checkpoint of the stage's next fit call."""
        checkpoint = FitCheckpoint(self.folder, self._calls, self.config, self.write, self.resumed)
        self._calls += 1
        return checkpoint

    def clear(self) -> None:
        """Remove every checkpoint of the stage (it is cached, or it must start again)."""
        if self.write:
            shutil.rmtree(self.folder, ignore_errors=True)
