"""Checkpoints inside a stage: a run killed mid-stage resumes there and ends bit for bit as an uninterrupted one."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.core.checkpoints import CheckpointConfig, StageCheckpoints
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.training import LoopHooks, TrainConfig, cross_entropy_loss, train_
from stages import get_stage
from tests.conftest import stage_context, synthetic_bundle

CFG = TrainConfig(epochs=4, lr=0.05, precision="fp32", channels_last=False)


class Killed(Exception):
    """Stands for SIGTERM / Ctrl-C arriving in the middle of a step."""


def _killer(at_step: int):
    """The default loss, until the `at_step`-th call (1-based), which raises."""
    inner, calls = cross_entropy_loss(0.0), [0]

    def loss(model, images, labels):
        calls[0] += 1
        if calls[0] == at_step:
            raise Killed(f"killed at step {at_step}")
        return inner(model, images, labels)

    return loss


def _model():
    torch.manual_seed(0)
    import timm

    return timm.create_model("test_resnet", num_classes=4, drop_rate=0.2)  # dropout: the global generator matters


def _train(bundle, folder, *, loss=None, every_minutes=None, seen=None):
    """train_ on the synthetic bundle with checkpoints in `folder`; `seen` collects the hooks' epochs."""
    model = _model()
    checkpoints = StageCheckpoints(folder, CheckpointConfig(every_minutes=every_minutes))
    hooks = LoopHooks(loss=loss, on_epoch_end=(lambda e, s: seen.append((e, s["train_loss"]))) if seen is not None
                      else None)  # fmt: skip
    loader = bundle.train_loader(16, seed=1, augment=True)
    report = train_(model, loader, CFG, fixed=FixedWeights(), device=torch.device("cpu"), hooks=hooks, progress=False,
                    checkpoint=checkpoints.next_fit())  # fmt: skip
    return model, report, checkpoints


def _untimed(history):
    return [{k: v for k, v in epoch.items() if k != "epoch_seconds"} for epoch in history]


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("every_minutes", [None, 1e-9], ids=["at-epoch-ends", "every-step"])
def test_a_call_killed_mid_epoch_resumes_and_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path, caplog, every_minutes):
    """Killed in the 3rd of 4 epochs (batch 2 of 4): with epoch checkpoints it goes on from epoch 3, with timed ones
    (here after every step) from the batch where it stopped; either way the model is the uninterrupted one."""
    bundle = synthetic_bundle(n_train=64)  # 4 batches of 16 per epoch
    reference, ref_report, _ = _train(bundle, tmp_path / "reference")
    with pytest.raises(Killed):
        _train(bundle, tmp_path / "work", loss=_killer(at_step=10), every_minutes=every_minutes)
    assert (tmp_path / "work" / "fit-0.progress.pt").is_file()
    seen = []
    with caplog.at_level(logging.INFO, logger="pipeline"):
        resumed, report, checkpoints = _train(bundle, tmp_path / "work", every_minutes=every_minutes, seen=seen)
    where = "epoch 3/4, batch 2" if every_minutes else "epoch 3/4"
    assert f"resuming train at {where}" in caplog.text and checkpoints.resumed == [f"train at {where}"]
    _assert_same_model(resumed, reference)
    assert _untimed(report.history) == _untimed(ref_report.history) and report.steps == ref_report.steps
    assert [e for e, _ in seen] == [0, 1, 2, 3]  # the epochs before the kill are replayed to the hooks
    assert (tmp_path / "work" / "fit-0.pt").is_file() and not (tmp_path / "work" / "fit-0.progress.pt").exists()


def test_a_finished_call_is_not_trained_again(tmp_path):
    bundle = synthetic_bundle(n_train=64)
    first, report, _ = _train(bundle, tmp_path / "work")
    state = torch.random.get_rng_state()
    again, again_report, checkpoints = _train(bundle, tmp_path / "work", loss=_killer(at_step=1))  # would raise
    _assert_same_model(again, first)
    assert again_report.history == report.history and checkpoints.resumed == ["train: finished"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the generators as the finished call left them


def test_a_stage_of_several_fit_calls_resumes_in_the_call_it_was_killed_in(tmp_path, monkeypatch):
    """INQ retrains after each of its portions (one fit call each): killed in the second retraining, the rerun
    replays the first portion's quantization, reuses the first retraining and resumes the second; the quantized
    weights and the model end as without the kill."""
    bundle = synthetic_bundle(n_train=64)
    torch.manual_seed(0)
    base = get_stage("train").run(None, get_stage("train").config(epochs=1), stage_context(bundle)).state
    inq = get_stage("inq").config(epochs=2, accumulated_portions=(0.5, 0.75, 1.0), precision="fp32")

    def run(folder, loss_kill=None):
        import copy

        ctx = stage_context(bundle, baseline=base)
        ctx.checkpoints = StageCheckpoints(folder)
        if loss_kill is not None:
            original = ctx.fit

            def fit(state, config, **kwargs):  # kill the second call in its second epoch
                if kwargs.get("step") == 1:
                    kwargs["loss"] = loss_kill
                return original(state, config, **kwargs)

            monkeypatch.setattr(ctx, "fit", fit)
        torch.manual_seed(1)
        return get_stage("inq").run(copy.deepcopy(base), inq, ctx), ctx.checkpoints

    reference, _ = run(tmp_path / "reference")
    with pytest.raises(Killed):
        run(tmp_path / "work", loss_kill=_killer(at_step=6))
    monkeypatch.undo()
    resumed, checkpoints = run(tmp_path / "work")
    assert checkpoints.resumed == ["inq 50.0%: finished", "inq 75.0% at epoch 2/2"]
    _assert_same_model(resumed.state.model, reference.state.model)
    assert resumed.metrics == reference.metrics


def test_checkpoints_are_written_by_rank_0_only_and_cleared(tmp_path):
    reader = StageCheckpoints(tmp_path / "work", write=False)
    reader.next_fit().save_progress({"epoch": 1})
    assert not (tmp_path / "work").exists()
    writer = StageCheckpoints(tmp_path / "work")
    writer.next_fit().save_finished({"epoch": 1})
    assert (tmp_path / "work" / "fit-0.pt").is_file()
    assert writer.next_fit().finished() is None  # each call has its own files
    writer.clear()
    assert not (tmp_path / "work").exists()


def test_an_unreadable_checkpoint_starts_the_call_again(tmp_path, caplog):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "fit-0.progress.pt").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert StageCheckpoints(tmp_path / "work").next_fit().progress() is None
    assert "cannot be read" in caplog.text
