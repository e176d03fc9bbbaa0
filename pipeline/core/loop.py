"""Inside one `train_` call: the optimizer step (`Step`), the epoch's sums kept on the device, and `Training`, which
runs the epochs from wherever the call stands (its start, or a checkpoint it resumes from) and writes checkpoints.
`pipeline.core.training` builds and starts it."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.core import distributed
from pipeline.core.checkpoints import FitCheckpoint, rng_state, set_rng_state
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.metrics import EPOCH_VAL_METRIC
from pipeline.core.precision import Numerics

if TYPE_CHECKING:
    from pipeline.core.training import TrainConfig

log = logging.getLogger("pipeline.core.training")  # one line per epoch off a terminal
run_log = logging.getLogger("pipeline")
SYNC_STEPS = 50
"""Steps between reads of the loss and accuracy sums from the device (and the finite-loss check)."""

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""A loader: (images, labels) batches, with `len()`; labels are class indices, or soft targets (batch x classes)
when batches are mixed (mixup / cutmix). Under torchrun each rank's loader yields its own part of every batch."""

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(model, images, labels) -> (loss, logits). Distillation supplies its own."""


@dataclass
class LoopHooks:
    """What a stage may plug into the loop without copying it."""

    loss: LossFn | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    # After each epoch, before `on_epoch_end`: measurements of the model as it stands (e.g. the validation accuracy
    # a search's pruner reads), added to the epoch's stats and report entry. It must leave the model as it found it.
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class TrainReport:
    """What the loop measured: per epoch the mean loss, train accuracy (percent), final LR and seconds (of the
    process that trained it: a resumed epoch counts from the resume); wall time in seconds."""

    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    numerics: list[str] = field(default_factory=list)  # what the runs trained in (`Numerics.describe`), each once

    def extend(self, other: TrainReport) -> None:
        """Append another run's epochs (e.g. the next pruning or INQ step) to this report."""
        self.epochs += other.epochs
        self.steps += other.steps
        self.seconds += other.seconds
        self.history.extend(other.history)
        self.numerics.extend(n for n in other.numerics if n not in self.numerics)


@dataclass
class Step:
    """What every step of one `train_` call uses, built once: optimizer, LR schedule, gradient scaler, fixed weights,
    loss and numerics."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    fixed: FixedWeights
    device: torch.device
    numerics: Numerics
    loss_fn: LossFn
    grad_clip_norm: float | None

    def step_(self, model: nn.Module, forward: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """One optimizer step of `model` on a batch already on the device; `forward` is the module the batch goes
        through (`model`, or it wrapped in DDP or compiled). Returns (loss, logits), left on the device."""
        with self.numerics.autocast(self.device):
            loss, logits = self.loss_fn(forward, images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.fixed.mask_grads_(model)  # fixed weights address the parameters by the model's own names
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.fixed.project_(model)
        self.scheduler.step()
        return loss, logits

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # before the schedule: it restores the groups' LR keys
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass
class _EpochSums:
    """Loss and correct-prediction sums of the epoch in progress, on the training device: read only every
    SYNC_STEPS steps, so a step never waits for the device to finish the one before."""

    loss: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def start(cls, device: torch.device, saved: tuple[float, int, int] | None = None) -> _EpochSums:
        loss, correct, seen = saved or (0.0, 0, 0)
        return cls(torch.tensor(loss, dtype=torch.float64, device=device),
                   torch.tensor(correct, dtype=torch.int64, device=device), seen)  # fmt: skip

    def add_(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        batch = labels.shape[0]
        self.loss += loss.detach().double() * batch
        hard = labels.argmax(1) if labels.ndim == 2 else labels  # mixed batches: the dominant class
        self.correct += (logits.detach().argmax(1) == hard).sum()
        self.seen += batch

    def state(self) -> tuple[float, int, int]:
        """(loss sum, correct, seen) as Python numbers: one read from the device."""
        return float(self.loss), int(self.correct), self.seen

    def means(self, desc: str) -> tuple[float, float]:
        """(mean loss, top-1 percent) so far; raises when the loss is no longer finite."""
        loss, correct, seen = self.state()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss} (lower lr or check the input model)")
        return loss / max(seen, 1), 100.0 * correct / max(seen, 1)


def _iter_from(loader: Batches, start: int) -> Iterator:
    """The epoch's batches from batch `start` on: the loader's own `iter_from` (it skips without reading), else
    read and dropped."""
    if start and hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    return itertools.islice(iter(loader), start, None)


def _loader_state(loader: Batches) -> dict[str, Any] | None:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


class Training:
    """One `train_` call in progress: where it stands (epoch, batch), its sums and report, and its checkpoints."""

    def __init__(self, model: nn.Module, loader: Batches, cfg: TrainConfig, loop: Step, hooks: LoopHooks, *,
                 desc: str, checkpoint: FitCheckpoint | None) -> None:  # fmt: skip
        self.model, self.loader, self.cfg, self.loop, self.hooks = model, loader, cfg, loop, hooks
        self.desc, self.checkpoint = desc, checkpoint
        self.report = TrainReport()
        self.epoch, self.step = 0, 0  # the next batch to train
        self.sums = _EpochSums.start(loop.device)
        self.loader_state = _loader_state(loader)  # as the current epoch started
        self.seconds_before = 0.0  # trained before a resume
        self.started = time.perf_counter()  # when this process began training the call

    def resume_(self, saved: dict[str, Any]) -> None:
        """Continue from a progress checkpoint: the finished epochs replayed to the hooks, then every state put back
        as it was when the checkpoint was written."""
        self.report = saved["report"]
        if self.hooks.on_epoch_end is not None:
            for epoch, stats in enumerate(self.report.history):
                self.hooks.on_epoch_end(epoch, stats)
        self.model.load_state_dict(saved["model"])
        self.loop.load_state_dict(saved["loop"])
        self.epoch, self.step, self.seconds_before = saved["epoch"], saved["step"], saved["seconds"]
        self.sums = _EpochSums.start(self.loop.device, saved["sums"])
        self.loader_state = saved["loader"]
        if self.loader_state is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(self.loader_state)
        set_rng_state(saved["rng"])
        where = f"epoch {self.epoch + 1}/{self.cfg.epochs}" + (f", batch {self.step + 1}" if self.step else "")
        run_log.info("resuming %s at %s", self.desc, where)
        if self.checkpoint is not None:
            self.checkpoint.note_resumed(f"{self.desc} at {where}")

    def run_(self, forward: nn.Module, *, bar: bool, lines: bool) -> TrainReport:
        """Train the remaining epochs; `bar`: a progress bar per epoch; `lines`: a log line per epoch."""
        self.started, first_epoch = time.perf_counter(), self.epoch
        while self.epoch < self.cfg.epochs:
            epoch_start = time.perf_counter()
            stats = self._epoch_(forward, bar=bar)
            if self.hooks.evaluate is not None:
                stats.update(self.hooks.evaluate(self.model))
            done = self.epoch + 1
            if lines and distributed.is_main():
                now = time.perf_counter()
                _log_epoch(self.desc, done, self.cfg.epochs, stats, seconds=now - epoch_start,
                           elapsed=now - self.started, resumed_at=first_epoch)  # fmt: skip
            self.report.steps += len(self.loader)
            self.report.history.append(stats)
            if self.hooks.on_epoch_end is not None:
                self.hooks.on_epoch_end(self.epoch, stats)
            self.epoch, self.step = done, 0
            self.sums, self.loader_state = _EpochSums.start(self.loop.device), _loader_state(self.loader)
            if self.checkpoint is not None and done < self.cfg.epochs and self.checkpoint.epoch_due(done):
                self._save_progress()
        self.report.epochs = self.cfg.epochs
        self.report.seconds = self.seconds_before + time.perf_counter() - self.started
        return self.report

    def _epoch_(self, forward: nn.Module, *, bar: bool) -> dict[str, float]:
        """The rest of the current epoch; returns its mean loss, train top-1 (percent) and final learning rate."""
        forward.train()
        loop, total, started = self.loop, len(self.loader), time.perf_counter()
        desc = f"{self.desc} {self.epoch + 1}/{self.cfg.epochs}"
        batches = tqdm(_iter_from(self.loader, self.step), total=total, initial=self.step, unit="batch", leave=False,
                       desc=desc, disable=not bar, dynamic_ncols=True)  # fmt: skip
        for images, labels in batches:
            images, labels = images.to(loop.device, non_blocking=True), labels.to(loop.device, non_blocking=True)
            if loop.numerics.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            loss, logits = loop.step_(self.model, forward, images, labels)
            self.sums.add_(loss, logits, labels)
            self.step += 1
            if self.step % SYNC_STEPS == 0:
                mean_loss, top1 = self.sums.means(self.desc)
                batches.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{top1:.1f}")
            if self.checkpoint is not None and self.step < total and self.checkpoint.time_due():
                self._save_progress()
        mean_loss, top1 = self.sums.means(self.desc)
        _check_finite(self.model, self.desc)
        return {"train_loss": mean_loss, "train_top1": top1, "lr": loop.optimizer.param_groups[0]["lr"],
                "epoch_seconds": time.perf_counter() - started}  # fmt: skip

    def _save_progress(self) -> None:
        """Write where the call stands: enough to go on from here as if it had not stopped."""
        self.checkpoint.save_progress({
            "epoch": self.epoch,
            "step": self.step,
            "loader": self.loader_state,
            "sums": self.sums.state(),
            "model": self.model.state_dict(),
            "loop": self.loop.state_dict(),
            "rng": rng_state(),
            "report": self.report,
            "seconds": self.seconds_before + time.perf_counter() - self.started,
        })  # fmt: skip


def _check_finite(model: nn.Module, desc: str) -> None:
    """Raise when a weight is no longer finite (one read from the device per epoch): a NaN gradient in the epoch's
    last step leaves the loss finite but the model broken."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params or bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        return
    bad = next(n for n, p in model.named_parameters() if p.is_floating_point() and not p.detach().isfinite().all())
    raise FloatingPointError(f"{desc}: weights of {bad} are no longer finite (lower lr, or try precision: fp32)")


def _log_epoch(desc: str, done: int, epochs: int, stats: dict[str, float], *, seconds: float, elapsed: float,
               resumed_at: int = 0):  # fmt: skip
    """One line for a finished epoch: loss, train top-1, its seconds, and how long the remaining epochs should take
    (from the epochs this process trained: `resumed_at` of them were trained before a resume)."""
    eta = elapsed / max(done - resumed_at, 1) * (epochs - done)
    val = f", val top-1 {stats[EPOCH_VAL_METRIC]:.2f}%" if EPOCH_VAL_METRIC in stats else ""
    log.info(
        "%s: epoch %d/%d, loss %.4f, train top-1 %.2f%%%s, %s, ETA %s",
        desc, done, epochs, stats["train_loss"], stats["train_top1"], val, _duration(seconds), _duration(eta),
    )  # fmt: skip


def _duration(seconds: float) -> str:
    """`seconds` as 4.2s, 3m05s or 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"
