"""The one training loop every stage trains through: baseline, fine-tuning, INQ retraining, QAT, distillation.

Constraints from earlier stages are enforced here, once: gradients of fixed weights are masked
before each optimizer step and fixed weights are projected back to their values after it.

The loop trains in the config's numerics (`pipeline.core.precision`: bf16 / fp16 autocast, channels_last), keeps the
epoch's loss and accuracy sums on the training device (read once every `SYNC_STEPS` steps and at the epoch's end, so a
GPU is not stalled every step), and writes checkpoints a killed run resumes from (`pipeline.core.checkpoints`).
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import timm.optim
import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from pipeline.core import distributed
from pipeline.core.checkpoints import FitCheckpoint, rng_state, set_rng_state
from pipeline.core.config import StrictConfig
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.precision import (
    ChannelsLastSetting,
    Numerics,
    PrecisionSetting,
    cpu_autocast_hazards,
    is_fake_quantized,
    resolve_numerics,
)

log = logging.getLogger("pipeline.core.training")  # one line per epoch off a terminal
run_log = logging.getLogger("pipeline")
SYNC_STEPS = 50
"""Steps between reads of the loss and accuracy sums from the device (and the finite-loss check)."""
TRAINING_VERSION = 2
"""Version of what the shared training code computes (this loop, fixed weights, numerics, model building): in every
stage cache key. 2: precision and channels_last (issue #23)."""


class TrainConfig(StrictConfig):
    """Hyper-parameters of one training run through the shared loop."""

    epochs: int = Field(1, ge=0, le=10_000, description="passes over the training split (0: no training)")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimizer, built by timm.optim")
    lr: float = Field(0.1, gt=0, le=10, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD)")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay (not applied to norms and biases)")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="per-step LR schedule")
    warmup_fraction: float = Field(0.15, ge=0, lt=1, description="share of steps spent warming up (onecycle)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")
    precision: PrecisionSetting = Field(
        "auto",
        description="autocast precision of the forward and backward (weights stay fp32): auto = bf16 on CUDA and on "
        "CPUs with AVX512_BF16 or AMX, else fp32 (fp16 on CUDA without bf16); a fake-quantized model (qat and "
        "after) always trains in fp32",
    )
    channels_last: ChannelsLastSetting = Field(
        "auto", description="train in channels_last memory format: auto = where auto precision picks bf16"
    )
    compile: bool = Field(
        False, description="torch.compile the training forward (compile time is paid by every stage that trains)"
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0; set nesterov: false for plain SGD")
        return self

    # A sweep's fixed budget gives each stage a number of epochs; stages whose `epochs` means something
    # else (per INQ portion step, per pruning step) override these two.
    def total_epochs(self) -> int:
        """Epochs over the training split this config trains in all."""
        return self.epochs

    def with_total_epochs(self, epochs: int):
        """A validated copy that trains about `epochs` epochs in all (at least one where it trains at all)."""
        return type(self).model_validate({**self.model_dump(), "epochs": epochs})

    def numerics(self, device: torch.device, model: nn.Module | None = None,
                 input_size: tuple[int, ...] | None = None) -> Numerics:  # fmt: skip
        """What this config trains `model` in on `device` (`auto` resolved): fp32 for a fake-quantized model, and
        where a reduced-precision CPU backward would be wrong for it at `input_size` (`cpu_autocast_hazards`)."""
        fp32_only = model is not None and is_fake_quantized(model)
        hazards = None
        reduced = resolve_numerics(self.precision, self.channels_last, device).dtype is not None
        if reduced and not fp32_only and model is not None and input_size is not None and device.type == "cpu":
            hazards = cpu_autocast_hazards(model, input_size)
        return resolve_numerics(self.precision, self.channels_last, device, fp32_only=fp32_only, hazards=hazards)


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameters."""
    # timm's factory keeps weight decay off norms and biases; its "sgd" is Nesterov, "momentum" is not.
    opt = "adamw" if cfg.optimizer == "adamw" else ("sgd" if cfg.nesterov else "momentum")
    return timm.optim.create_optimizer_v2(
        model, opt=opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """The configured learning-rate schedule, stepped once per batch over `total_steps` batches."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1), pct_start=max(cfg.warmup_fraction, 1e-3)
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def cross_entropy_loss(label_smoothing: float) -> LossFn:
    """The default loss: cross-entropy with label smoothing."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return criterion(logits.float(), labels), logits  # the loss in fp32 under autocast

    return loss


@dataclass
class _Loop:
    """What every step of one `train_` call uses, built once: optimizer, LR schedule, gradient scaler, constraints,
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
        self.fixed.mask_grads_(model)  # constraints address the parameters by the model's own names
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


def train_(
    model: nn.Module,
    loader: Batches,
    cfg: TrainConfig,
    *,
    fixed: FixedWeights,
    device: torch.device,
    hooks: LoopHooks | None = None,
    desc: str = "train",
    progress: bool = True,
    checkpoint: FitCheckpoint | None = None,
    sync_batchnorm: bool = False,
    input_size: tuple[int, ...] | None = None,
) -> TrainReport:
    """Train `model` in place for `cfg.epochs` epochs, keeping every fixed weight fixed.

    `progress` draws a tqdm bar per epoch while stderr is a terminal. Off a terminal (a log file, CI, nohup, a
    Ray worker) a bar is noise, so one INFO line per epoch goes to the `pipeline.core.training` logger instead,
    whether or not `progress` is set, so callers that turn bars off there (the CLI) still leave a trace.

    With a `checkpoint`, the call writes its progress there (`pipeline.core.checkpoints`) and resumes from it: a call
    that had finished trains nothing, one that was interrupted goes on from its last checkpoint. `sync_batchnorm`:
    under torchrun, BatchNorm statistics are computed over every rank's part of the batch. `input_size` (C, H, W)
    lets `precision: auto` check the model's convolutions against a CPU bf16 bug (`pipeline.core.precision`).
    """
    hooks = hooks or LoopHooks()
    if cfg.epochs == 0:
        return TrainReport()
    if checkpoint is not None and (finished := checkpoint.finished()) is not None:
        return _reuse_finished_(model, finished, hooks, device=device, desc=desc, checkpoint=checkpoint)
    numerics = cfg.numerics(device, model, input_size)
    run_log.info("%s: training in %s", desc, numerics.describe())
    loop = _build_loop(model, cfg, numerics, fixed=fixed, device=device, loss=hooks.loss,
                       total_steps=cfg.epochs * len(loader))  # fmt: skip
    training = _Training(model, loader, cfg, loop, hooks, desc=desc, checkpoint=checkpoint)
    if checkpoint is not None and (saved := checkpoint.progress()) is not None:
        training.resume_(saved)
    training.report.numerics = [numerics.describe()]
    restore_norms = distributed.sync_batchnorm_(model) if sync_batchnorm else None
    try:
        forward = distributed.wrap(model, device)  # DDP under torchrun: gradients averaged over ranks
        if cfg.compile:
            forward = torch.compile(forward)
        terminal = sys.stderr is not None and sys.stderr.isatty()
        report = training.run_(forward, bar=progress and terminal and distributed.is_main(), lines=not terminal)
    finally:
        model.to(memory_format=torch.contiguous_format)
        if restore_norms is not None:
            restore_norms()
    if checkpoint is not None:
        checkpoint.save_finished({"model": model.state_dict(), "rng": rng_state(), "report": report})
    return report


def _reuse_finished_(model: nn.Module, finished: dict[str, Any], hooks: LoopHooks, *, device: torch.device, desc: str,
                     checkpoint: FitCheckpoint) -> TrainReport:  # fmt: skip
    """A call that had finished before the run stopped: its epochs replayed to the hooks, the model and the random
    generators as it left them; nothing trains."""
    report: TrainReport = finished["report"]
    if hooks.on_epoch_end is not None:
        for epoch, stats in enumerate(report.history):
            hooks.on_epoch_end(epoch, stats)
    model.to(device).load_state_dict(finished["model"])
    set_rng_state(finished["rng"])
    run_log.info("%s: finished before the run stopped; its checkpoint is reused", desc)
    checkpoint.note_resumed(f"{desc}: finished")
    return report


def _build_loop(model, cfg: TrainConfig, numerics: Numerics, *, fixed: FixedWeights, device, loss: LossFn | None,
                total_steps: int) -> _Loop:  # fmt: skip
    """Move `model` to `device` in its memory format, build its optimizer and schedule, and start it inside its
    constraints."""
    model.to(device)
    model.to(memory_format=numerics.memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=total_steps)
    fixed.project_(model)
    loss_fn = loss or cross_entropy_loss(cfg.label_smoothing)
    return _Loop(optimizer, scheduler, numerics.scaler(device), fixed, device, numerics, loss_fn, cfg.grad_clip_norm)


def _iter_from(loader: Batches, start: int) -> Iterator:
    """The epoch's batches from batch `start` on: the loader's own `iter_from` (it skips without reading), else
    read and dropped."""
    if start and hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    return itertools.islice(iter(loader), start, None)


def _loader_state(loader: Batches) -> dict[str, Any] | None:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


class _Training:
    """One `train_` call in progress: where it stands (epoch, batch), its sums and report, and its checkpoints."""

    def __init__(self, model: nn.Module, loader: Batches, cfg: TrainConfig, loop: _Loop, hooks: LoopHooks, *,
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
    log.info(
        "%s: epoch %d/%d, loss %.4f, train top-1 %.2f%%, %s, ETA %s",
        desc, done, epochs, stats["train_loss"], stats["train_top1"], _duration(seconds), _duration(eta),
    )  # fmt: skip


def _duration(seconds: float) -> str:
    """`seconds` as 4.2s, 3m05s or 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"
