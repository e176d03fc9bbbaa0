"""The `distill` stage: knowledge distillation (Hinton et al. 2015) of the current model from a teacher.

Loss = α·T²·KL(p_teacher ‖ p_student) + (1−α)·CE(student, labels), with p = softmax(logits / T).
The student trains through the shared loop, so whatever earlier stages imposed (pruned zeros,
INQ-frozen weights) is kept while it learns from the teacher.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import timm
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from pipeline.core.artifacts import load_artifact
from pipeline.core.metrics import accuracy
from pipeline.core.models import ModelConfig, ModelState, create_model
from pipeline.core.training import LossFn, TrainConfig
from stages.base import StageContext, StageOutput, register_stage


class DistillConfig(TrainConfig):
    """Teacher, temperature and mixing weight; the inherited training fields configure the student's training."""

    teacher: str = Field(
        "baseline",
        description="baseline (the chain's trained baseline), input (the model as it entered this stage), "
        "a path to a pipeline artifact, or a timm model name (its pretrained weights; needs network)",
    )
    teacher_checkpoint: Path | None = Field(
        None, description="with a timm model name as teacher: a local state_dict for it instead of hub weights"
    )
    temperature: float = Field(4.0, gt=0, le=100, description="softmax temperature T of both teacher and student")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term; 1 - alpha weighs the labels")
    lr: float = Field(0.01, gt=0, le=10, description="peak learning rate of the student")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("cosine", description="per-step LR schedule")

    @field_validator("teacher")
    @classmethod
    def _resolvable(cls, teacher: str) -> str:
        if teacher in {"baseline", "input"} or Path(teacher).expanduser().is_file() or timm.is_model(teacher):
            return teacher
        raise ValueError(
            f"teacher {teacher!r} is neither 'baseline', 'input', an existing artifact file, nor a timm model name"
        )

    @model_validator(mode="after")
    def _checkpoint_needs_a_timm_teacher(self) -> DistillConfig:
        if self.teacher_checkpoint is not None:
            if not timm.is_model(self.teacher) or Path(self.teacher).is_file():
                raise ValueError("teacher_checkpoint needs a timm model name as teacher")
            if not self.teacher_checkpoint.expanduser().is_file():
                raise ValueError(f"teacher_checkpoint file not found: {self.teacher_checkpoint}")
        return self


def distillation_loss(student_logits, teacher_logits, labels, *, temperature: float, alpha: float, label_smoothing=0.0):
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y); the T² keeps gradient scale independent of T."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def kd_loss(teacher: nn.Module, config: DistillConfig) -> LossFn:
    """The shared loop's loss hook: the teacher runs in eval mode without gradients."""

    def loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        with torch.inference_mode():
            teacher_logits = teacher(images)
        logits = model(images)
        value = distillation_loss(logits, teacher_logits.clone(), labels, temperature=config.temperature,
                                  alpha=config.alpha, label_smoothing=config.label_smoothing)  # fmt: skip
        return value, logits

    return loss


def random_head(config: DistillConfig, num_classes: int) -> str | None:
    """Why a timm-name teacher would teach from a random classifier, or None: without `teacher_checkpoint` it gets
    timm's pretrained weights, whose head (ImageNet's 1000 classes, typically) is dropped for another class count."""
    if config.teacher in {"baseline", "input"} or config.teacher_checkpoint is not None:
        return None
    if Path(config.teacher).expanduser().is_file():
        return None
    pretrained = timm.models.get_pretrained_cfg(config.teacher)
    classes = getattr(pretrained, "num_classes", None)
    if classes == num_classes:
        return None
    return (
        f"teacher {config.teacher!r}: its pretrained classifier has {classes or 'an unknown number of'} classes, the "
        f"data {num_classes}, so it would teach from a random head; give teacher_checkpoint: (the teacher "
        "fine-tuned on this data), or teacher: baseline"
    )


def resolve_teacher(config: DistillConfig, state: ModelState, ctx: StageContext) -> nn.Module:
    """The teacher module, frozen and in eval mode."""
    if config.teacher == "baseline":
        teacher = ctx.baseline().model
    elif config.teacher == "input":
        teacher = copy.deepcopy(state.model)
    elif Path(config.teacher).expanduser().is_file():
        teacher = load_artifact(Path(config.teacher).expanduser())
    else:  # a timm model: a local checkpoint, else its pretrained hub weights (whose head must fit the data)
        if (problem := random_head(config, ctx.data.num_classes)) is not None:
            raise ValueError(problem)
        source = ModelConfig(name=config.teacher, pretrained=config.teacher_checkpoint is None,
                             checkpoint=config.teacher_checkpoint, reset_classifier=False)  # fmt: skip
        teacher, _ = create_model(source, ctx.data.num_classes)
    if teacher is state.model:  # in-process callers may hand the student itself as the baseline
        teacher = copy.deepcopy(teacher)
    teacher.eval().requires_grad_(False)
    return teacher.to(ctx.device)


@register_stage("distill", config=DistillConfig, lowers=set())
def run_distill(state: ModelState | None, config: DistillConfig, ctx: StageContext) -> StageOutput:
    """Train the current model (student) against a teacher's softened outputs, keeping its fixed weights."""
    if state is None:
        raise ValueError("distill needs an input model (the student): it cannot be the first stage")
    teacher = resolve_teacher(config, state, ctx)
    # The teacher runs inside the student's autocast; in the student's memory format too, so the batches need no
    # conversion on their way through it.
    numerics = config.numerics(ctx.device, state.model, ctx.data.input_size)
    teacher.to(memory_format=numerics.memory_format)
    # Measured on validation (test when the data has none): these figures may inform a choice of teacher.
    split = ctx.data.splits[0]
    images = ctx.data.eval_loader(split)
    teacher_top1, _ = accuracy(teacher, images, device=ctx.device)
    student_before, _ = accuracy(state.model.to(ctx.device), images, device=ctx.device)
    report = ctx.fit(state, config, desc="distill", loss=kd_loss(teacher, config))
    prefix = "val_" if split == "val" else ""
    metrics = {f"teacher_{prefix}top1": teacher_top1, f"student_{prefix}top1_before": student_before}
    return StageOutput(state, metrics=metrics, report=report)
