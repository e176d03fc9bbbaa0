"""The shared loop: it learns, and it keeps every fixed weight exactly where earlier stages put it."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch
from torch import nn

from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.training import LoopHooks, TrainConfig, train_
from tests.conftest import synthetic_bundle


def _tiny_cnn(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def test_loop_learns_a_learnable_task():
    bundle = synthetic_bundle(n_train=128)
    model = _tiny_cnn()
    seen = []
    report = train_(
        model,
        bundle.train_loader(32, seed=0, augment=False),
        TrainConfig(epochs=6, lr=0.1, schedule="onecycle"),
        fixed=FixedWeights(),
        device=torch.device("cpu"),
        hooks=LoopHooks(on_epoch_end=lambda e, s: seen.append(e)),
        progress=False,
    )
    assert report.epochs == 6 and report.steps == 6 * 4 and seen == list(range(6))
    assert report.history[-1]["train_loss"] < report.history[0]["train_loss"]
    assert report.history[-1]["train_top1"] > 60


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("numerics", [("fp32", False), ("bf16", True)], ids=["fp32", "bf16-channels_last"])
def test_fixed_weights_never_move(optimizer, numerics):
    """Momentum and weight decay included, in bf16 autocast too: fixed entries stay bit-identical across many steps
    (the weights stay fp32; only the forward and backward compute in bf16)."""
    bundle = synthetic_bundle(n_train=64)
    model = _tiny_cnn()
    conv = model[0].weight
    mask = torch.rand(conv.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    values = torch.where(torch.rand(conv.shape) < 0.5, torch.zeros_like(conv), torch.full_like(conv, 0.25))
    fixed = FixedWeights()
    fixed.fix_("0.weight", mask, values)
    before_free = conv.detach().clone()
    train_(
        model,
        bundle.train_loader(16, seed=0, augment=True),
        TrainConfig(
            epochs=3,
            optimizer=optimizer,
            lr=0.05,
            weight_decay=0.1,
            momentum=0.9,
            precision=numerics[0],
            channels_last=numerics[1],
        ),  # fmt: skip
        fixed=fixed,
        device=torch.device("cpu"),
        progress=False,
    )
    assert torch.equal(conv.detach()[mask], values[mask])
    assert not torch.equal(conv.detach()[~mask], before_free[~mask])  # the rest did train


@pytest.mark.parametrize("precision,channels_last", [("bf16", True), ("bf16", False), ("fp16", False),
                                                    ("fp32", True)])  # fmt: skip
def test_every_precision_learns_and_gives_back_an_fp32_model_in_the_usual_layout(precision, channels_last):
    """fp16 goes through a gradient scaler; whatever trained, the model comes back fp32 and contiguous (exports
    and the cache see the usual layout), and the report says what it trained in."""
    bundle = synthetic_bundle(n_train=128)
    model = _tiny_cnn()
    cfg = TrainConfig(epochs=6, lr=0.1, precision=precision, channels_last=channels_last)
    report = train_(model, bundle.train_loader(32, seed=0, augment=False), cfg, fixed=FixedWeights(),
                    device=torch.device("cpu"), progress=False)  # fmt: skip
    assert report.history[-1]["train_top1"] > 60
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert report.numerics[0].startswith(precision + (", channels_last" if channels_last else ""))


def test_non_finite_weights_fail_the_epoch_even_when_the_loss_is_finite(monkeypatch):
    """A NaN gradient in an epoch's last step leaves every loss of the epoch finite; the epoch still fails."""
    model = _tiny_cnn()
    real_step, steps = torch.optim.SGD.step, [0]

    def poisoning_step(self, closure=None):
        out = real_step(self, closure)
        steps[0] += 1
        if steps[0] == 4:  # the epoch's last of 4 steps
            with torch.no_grad():
                model[5].bias[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    with pytest.raises(FloatingPointError, match="weights of 5.bias are no longer finite"):
        _train_plain(model, TrainConfig(epochs=1, precision="fp32"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train_two_epochs(progress: bool = True):
    loader = synthetic_bundle().train_loader(16, seed=0, augment=False)
    train_(_tiny_cnn(), loader, TrainConfig(epochs=2), fixed=FixedWeights(), device=torch.device("cpu"),
           desc="stage 0 (train)", progress=progress)  # fmt: skip


@pytest.mark.parametrize("progress", [True, False])
def test_off_a_terminal_each_epoch_is_one_log_line(monkeypatch, caplog, progress):
    """A log file, CI or a Ray worker gets one line per epoch instead of a bar (the CLI passes progress=False there)."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    caplog.set_level(logging.INFO, logger="pipeline.core.training")
    _train_two_epochs(progress)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.core.training"]
    number, seconds = r"\d+\.\d+", r"\d+\.\ds"
    assert len(lines) == 2
    assert re.fullmatch(
        rf"stage 0 \(train\): epoch 1/2, loss {number}, train top-1 {number}%, {seconds}, ETA {seconds}", lines[0]
    )
    assert lines[1].startswith("stage 0 (train): epoch 2/2,") and lines[1].endswith("ETA 0.0s")
    assert stderr.getvalue() == ""  # no bar


def test_on_a_terminal_progress_is_a_bar_not_log_lines(monkeypatch, caplog):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO, logger="pipeline.core.training")
    _train_two_epochs()
    assert not [r for r in caplog.records if r.name == "pipeline.core.training"]
    assert "stage 0 (train) 2/2" in terminal.getvalue()


def test_fixed_set_only_grows_and_keeps_old_values():
    fixed = FixedWeights()
    first = torch.tensor([True, False, False])
    fixed.fix_("w", first, torch.tensor([0.5, 0.0, 0.0]))
    fixed.fix_("w", torch.tensor([False, True, False]), torch.tensor([9.0, -1.0, 0.0]))
    assert fixed.mask("w").tolist() == [True, True, False]
    assert fixed.values("w").tolist() == [0.5, -1.0, 0.0]  # the first value was not overwritten
    assert fixed.fixed_count() == 2
    restored = FixedWeights.from_state_dict(fixed.state_dict())
    assert torch.equal(restored.mask("w"), fixed.mask("w"))


def test_fixed_weights_reject_unknown_parameters():
    fixed = FixedWeights()
    fixed.fix_("nope.weight", torch.ones(2, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(KeyError, match="nope.weight"):
        fixed.project_(_tiny_cnn())


def _train_plain(model, cfg: TrainConfig):
    loader = synthetic_bundle().train_loader(16, seed=0, augment=False)
    return train_(model, loader, cfg, fixed=FixedWeights(), device=torch.device("cpu"), progress=False)


def test_zero_epochs_does_nothing():
    model = _tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _train_plain(model, TrainConfig(epochs=0))
    assert report.epochs == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_diverging_loss_fails_loudly():
    model = _tiny_cnn()
    with torch.no_grad():
        model[5].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        _train_plain(model, TrainConfig(epochs=1))


def test_nesterov_without_momentum_is_rejected_at_load_time():
    with pytest.raises(ValueError, match="nesterov: true needs momentum > 0"):
        TrainConfig(momentum=0.0)
    assert TrainConfig(momentum=0.0, nesterov=False).momentum == 0.0


def test_compile_wraps_the_training_forward_only(monkeypatch):
    """`compile: true` trains through torch.compile's module (a spy here: compiling costs tens of seconds, and
    bench/compile.py times it for real); constraints and the returned model stay the plain module."""
    compiled = []

    def spy(module, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    model = _tiny_cnn()
    _train_plain(model, TrainConfig(epochs=1, compile=True))
    assert compiled == [model]
    _train_plain(model, TrainConfig(epochs=1))
    assert compiled == [model]
