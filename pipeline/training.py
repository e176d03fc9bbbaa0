"""The one training loop every stage trains through: baseline, fine-tuning, INQ retraining, QAT, distillation.

Constraints from earlier stages are enforced here, once: gradients of fixed weights are masked
before each optimizer step and fixed weights are projected back to their values after it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import timm.optim
import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.config import StrictConfig
from pipeline.constraints import FixedWeights

log = logging.getLogger("pipeline.training")


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
    """What the loop measured: per-epoch mean loss and train accuracy (percent), wall time in seconds."""

    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def extend(self, other: TrainReport) -> None:
        """Append another run's epochs (e.g. the next pruning or INQ step) to this report."""
        self.epochs += other.epochs
        self.steps += other.steps
        self.seconds += other.seconds
        self.history.extend(other.history)


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
        return criterion(logits, labels), logits

    return loss


@dataclass
class _Loop:
    """What every step of one `train_` call uses, built once: optimizer, LR schedule, constraints, loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    fixed: FixedWeights
    device: torch.device
    loss_fn: LossFn
    grad_clip_norm: float | None

    def step_(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, desc: str):
        """One optimizer step on a batch already on the device; returns (loss, logits)."""
        # `model` may be wrapped in DDP: constraints address the parameters by their own names.
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        loss, logits = self.loss_fn(model, images, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} (lower lr or check the input model)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.fixed.mask_grads_(inner)
        if self.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(inner.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.fixed.project_(inner)
        self.scheduler.step()
        return loss, logits


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
) -> TrainReport:
    """Train `model` in place for `cfg.epochs` epochs, keeping every fixed weight fixed.

    `progress` draws a tqdm bar per epoch while stderr is a terminal. Off a terminal (a log file, CI, nohup, a
    Ray worker) a bar is noise, so one INFO line per epoch goes to the `pipeline.training` logger instead,
    whether or not `progress` is set, so callers that turn bars off there (the CLI) still leave a trace.
    """
    hooks = hooks or LoopHooks()
    report = TrainReport()
    if cfg.epochs == 0:
        return report
    loop = _build_loop(model, cfg, fixed=fixed, device=device, loss=hooks.loss, total_steps=cfg.epochs * len(loader))
    net = distributed.wrap(model, device)  # DDP under torchrun: gradients averaged over ranks
    terminal, main = sys.stderr is not None and sys.stderr.isatty(), distributed.is_main()
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        stats = _train_epoch_(net, loader, loop, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                              progress=progress and terminal and main)  # fmt: skip
        if main and not terminal:
            now = time.perf_counter()
            _log_epoch(desc, epoch + 1, cfg.epochs, stats, seconds=now - epoch_start, elapsed=now - start)
        report.steps += len(loader)
        report.history.append(stats)
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(epoch, stats)
    report.epochs = cfg.epochs
    report.seconds = time.perf_counter() - start
    return report


def _build_loop(model, cfg: TrainConfig, *, fixed: FixedWeights, device, loss: LossFn | None, total_steps: int):
    """Move `model` to `device`, build its optimizer and schedule, and start it inside its constraints."""
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=total_steps)
    fixed.project_(model)
    loss_fn = loss or cross_entropy_loss(cfg.label_smoothing)
    return _Loop(optimizer, scheduler, fixed, device, loss_fn, cfg.grad_clip_norm)


def _train_epoch_(model: nn.Module, loader: Batches, loop: _Loop, *, desc: str, progress: bool):
    """One pass over `loader`; returns the epoch's mean loss, train top-1 (percent) and final learning rate."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(loop.device, non_blocking=True), labels.to(loop.device, non_blocking=True)
        loss, logits = loop.step_(model, images, labels, desc)
        batch = labels.shape[0]
        loss_sum += loss.item() * batch
        hard = labels.argmax(1) if labels.ndim == 2 else labels  # mixed batches: the dominant class
        correct += int((logits.argmax(1) == hard).sum())
        seen += batch
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_top1": 100.0 * correct / max(seen, 1),
        "lr": loop.optimizer.param_groups[0]["lr"],
    }


def _log_epoch(desc: str, done: int, epochs: int, stats: dict[str, float], *, seconds: float, elapsed: float):
    """One line for a finished epoch: loss, train top-1, its seconds, and how long the remaining epochs should take."""
    eta = elapsed / done * (epochs - done)
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
