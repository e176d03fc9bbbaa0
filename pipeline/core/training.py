"""The one training loop every stage trains through: baseline, fine-tuning, INQ retraining, QAT, distillation.

Weights earlier stages fixed are kept here, once: gradients of fixed weights are masked
before each optimizer step and fixed weights are projected back to their values after it.

The loop trains in the config's numerics (`pipeline.core.precision`: bf16 / fp16 autocast, channels_last), keeps the
epoch's loss and accuracy sums on the training device (read once every `SYNC_STEPS` steps and at the epoch's end, so a
GPU is not stalled every step), and writes checkpoints a killed run resumes from (`pipeline.core.checkpoints`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import timm.optim
import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.core import distributed
from pipeline.core.checkpoints import FitCheckpoint, rng_state, set_rng_state
from pipeline.core.config import StrictConfig
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.loop import Batches, LoopHooks, LossFn, Step, Training, TrainReport
from pipeline.core.precision import (
    ChannelsLastSetting,
    Numerics,
    PrecisionSetting,
    cpu_autocast_hazards,
    is_fake_quantized,
    resolve_numerics,
)

run_log = logging.getLogger("pipeline")
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
    training = Training(model, loader, cfg, loop, hooks, desc=desc, checkpoint=checkpoint)
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
                total_steps: int) -> Step:  # fmt: skip
    """Move `model` to `device` in its memory format, build its optimizer and schedule, and start it with its fixed
    weights at their values."""
    model.to(device)
    model.to(memory_format=numerics.memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=total_steps)
    fixed.project_(model)
    loss_fn = loss or cross_entropy_loss(cfg.label_smoothing)
    return Step(optimizer, scheduler, numerics.scaler(device), fixed, device, numerics, loss_fn, cfg.grad_clip_norm)
