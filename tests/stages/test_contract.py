"""Every registered stage, on a tiny model: its default config validates, its output still runs,
and the evaluator's metrics of its artifact are present and sane. A new stage is tested by registering it."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.artifacts import load_artifact, save_artifact
from pipeline.core.metrics import MODEL_METRICS, EvalConfig, evaluate
from stages import StageContext, available_stages, get_stage
from stages.base import METRIC_KINDS
from tests.conftest import stage_context, synthetic_bundle

FAST = EvalConfig(latency_runs=5, warmup_runs=1, throughput_runs=2, throughput_batch_size=4)


def _context(bundle, baseline_state=None) -> StageContext:
    return stage_context(bundle, baseline=baseline_state)


# The default numerics (`auto`: bf16 here or fp32, by machine), and bf16 + channels_last asked for explicitly. The bf16
# axis runs at 32 px: at 16 px the tiny ResNet's last stride-2 block sees a 1x1 input, where torch's CPU bf16 backward
# is wrong and explicit bf16 is refused (tests/pipeline/test_precision.py).
NUMERICS = {"default": {}, "bf16": {"precision": "bf16", "channels_last": True}}
BUNDLES = {"default": synthetic_bundle(), "bf16": synthetic_bundle(size=32)}


@pytest.fixture(params=list(NUMERICS))
def numerics(request) -> str:
    return request.param


@pytest.fixture
def tiny_bundle(numerics):
    return BUNDLES[numerics]


@pytest.fixture
def baseline(tiny_bundle, numerics):
    torch.manual_seed(0)
    config = get_stage("train").config(epochs=1, **NUMERICS[numerics])
    return get_stage("train").run(None, config, _context(tiny_bundle)).state


@pytest.mark.parametrize("name", available_stages())
def test_stage_contract(name, tiny_bundle, baseline, tmp_path, numerics):
    stage = get_stage(name)
    config = stage.config.model_validate(NUMERICS[numerics])  # the default config validates
    if stage.fake_quant and numerics == "bf16":  # fake quantization trains in fp32 only, and says so
        with pytest.raises(ValueError, match="fake-quantized"):
            stage.run(baseline, config, _context(tiny_bundle, baseline))
        return
    out = stage.run(baseline, config, _context(tiny_bundle, baseline))
    model = out.state.model.eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, *tiny_bundle.input_size))
    assert logits.shape == (2, tiny_bundle.num_classes) and torch.isfinite(logits).all()
    assert all(isinstance(v, float | int) for v in out.metrics.values())

    size = save_artifact(out.state, tmp_path / "artifact.pt")
    metrics = evaluate(
        load_artifact(tmp_path / "artifact.pt"), tiny_bundle.test_loader(8), tiny_bundle.input_size, FAST
    )
    assert size > 0
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert 0 < metrics["nonzero_params"] <= metrics["params"]
    assert metrics["macs"] > 0 and 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p90"]
    assert metrics["throughput_ips"] > 0
    _lowers_only_what_it_declares(name, config, baseline, {**metrics, "artifact_bytes": size}, tiny_bundle, tmp_path)


def _lowers_only_what_it_declares(name, config, baseline, after, bundle, tmp_path) -> None:
    """A search ends trials early on `register_stage(lowers=)`, so it must hold: a metric of a kind the stage says it
    cannot lower is not lower after it than in its input (timed metrics left out: they are noisy)."""
    kinds = get_stage(name).can_lower(config)
    assert kinds is None or kinds <= METRIC_KINDS
    if kinds is None or kinds == METRIC_KINDS:
        return
    size = save_artifact(baseline, tmp_path / "input.pt")
    before = evaluate(load_artifact(tmp_path / "input.pt"), bundle.test_loader(8), bundle.input_size, FAST)
    before["artifact_bytes"] = size
    for metric, (_, kind) in MODEL_METRICS.items():
        if kind is None or kind in kinds or "latency" in metric or "throughput" in metric:
            continue
        assert after[metric] >= 0.99 * before[metric], f"{name} lowered {metric} ({kind}) but does not declare it"
