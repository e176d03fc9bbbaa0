"""Distillation: the loss is Hinton's, the teacher never trains, earlier constraints survive."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipeline.core.artifacts import save_artifact
from pipeline.core.models import ModelSpec, ModelState
from stages import StageContext
from stages.distill import DistillConfig, distillation_loss, resolve_teacher, run_distill
from stages.inq import INQConfig, run_inq
from tests.conftest import TINY_MODEL, stage_context, synthetic_bundle

BUNDLE = synthetic_bundle(n_train=64, n_test=16)


def _state(seed=0) -> ModelState:
    spec = ModelSpec(TINY_MODEL, BUNDLE.num_classes)
    torch.manual_seed(seed)
    return ModelState(spec.build(), spec, {"mean": BUNDLE.mean, "std": BUNDLE.std, "input_size": BUNDLE.input_size})


def _ctx(baseline=None) -> StageContext:
    return stage_context(BUNDLE, baseline=baseline)


def test_loss_matches_hinton():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean()
    expected = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, temperature=T, alpha=a), expected, atol=1e-6)
    assert torch.allclose(distillation_loss(s, t, y, temperature=T, alpha=0.0), F.cross_entropy(s, y))
    assert distillation_loss(s, s, y, temperature=T, alpha=1.0).abs() < 1e-6


def test_teacher_stays_frozen_and_student_learns():
    teacher_state, student = _state(seed=1), _state(seed=2)
    before_teacher = {k: v.clone() for k, v in teacher_state.model.state_dict().items()}
    before_student = {k: v.clone() for k, v in student.model.state_dict().items()}
    out = run_distill(student, DistillConfig(epochs=2, lr=0.05), _ctx(baseline=teacher_state))
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher_state.model.state_dict().items())
    assert any(not torch.equal(v, before_student[k]) for k, v in out.state.model.state_dict().items())
    assert {"teacher_val_top1", "student_val_top1_before"} <= set(out.metrics) and out.report.epochs == 2


def test_distillation_keeps_inq_frozen_weights(tmp_path):
    ctx = _ctx(baseline=_state(seed=3))
    quantized = run_inq(_state(), INQConfig(bits=5, epochs=0), ctx).state
    frozen = {n: quantized.fixed.values(n).clone() for n in quantized.fixed.names()}
    out = run_distill(quantized, DistillConfig(epochs=1, lr=0.1), ctx)
    params = dict(out.state.model.named_parameters())
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())
    assert save_artifact(out.state, tmp_path / "inq.pt") > 0  # still on the power-of-two grid


def test_teacher_choices(tmp_path):
    baseline, student = _state(seed=4), _state(seed=5)
    assert torch.equal(next(resolve_teacher(DistillConfig(teacher="input"), student, _ctx()).parameters()),
                       next(student.model.parameters()))  # fmt: skip
    assert resolve_teacher(DistillConfig(teacher="input"), student, _ctx()) is not student.model
    save_artifact(baseline, tmp_path / "teacher.pt")
    from_file = resolve_teacher(DistillConfig(teacher=str(tmp_path / "teacher.pt")), student, _ctx())
    assert not from_file.training and not any(p.requires_grad for p in from_file.parameters())
    assert DistillConfig(teacher="resnet18").teacher == "resnet18"
    bigger = ModelSpec("resnet10t", BUNDLE.num_classes).build()
    torch.save(bigger.state_dict(), tmp_path / "bigger.pt")
    from_ckpt = resolve_teacher(DistillConfig(teacher="resnet10t", teacher_checkpoint=tmp_path / "bigger.pt"),
                                student, _ctx())  # fmt: skip
    assert torch.equal(from_ckpt.state_dict()["fc.weight"], bigger.state_dict()["fc.weight"])
    with pytest.raises(ValueError, match="teacher_checkpoint needs a timm model name"):
        DistillConfig(teacher="baseline", teacher_checkpoint=tmp_path / "bigger.pt")
    with pytest.raises(ValueError, match="neither 'baseline', 'input'"):
        DistillConfig(teacher="/no/such/file.pt")


def test_a_timm_teacher_without_a_checkpoint_is_refused_when_its_head_would_be_random(tmp_path, isolated, cifar_root):
    with pytest.raises(ValueError, match="pretrained classifier has 1000 classes, the data 4.*teacher_checkpoint"):
        resolve_teacher(DistillConfig(teacher="resnet18"), _state(), _ctx())
    from pipeline.recipe import RecipeError, validate_recipe
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(stages=[{"distill": {"teacher": "resnet18", "epochs": 1}}])
    with pytest.raises(RecipeError, match=r"stages\[0\].distill.teacher: .*1000 classes, the data 10.*teacher_check"):
        validate_recipe(recipe)  # refused when the recipe loads, before any training
