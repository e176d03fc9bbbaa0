"""The evaluator's metric functions against models whose answers are known."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.core.data import Split, TensorLoader
from pipeline.core.metrics import (
    EvalConfig,
    accuracy,
    count_macs,
    count_nonzero_params,
    count_params,
    evaluate,
    latency_ms,
    load_predictions,
    predictions,
    save_predictions,
    throughput_ips,
)

FAST = EvalConfig(latency_runs=5, warmup_runs=1, throughput_runs=2, throughput_batch_size=4)


class FixedScores(nn.Module):
    """Always ranks classes in the order of `scores`."""

    def __init__(self, scores):
        super().__init__()
        self.scores = nn.Parameter(torch.tensor(scores, dtype=torch.float32))

    def forward(self, x):
        return self.scores.expand(x.shape[0], -1)


def _loader(labels):
    labels = torch.tensor(labels)
    return TensorLoader(
        Split(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels), 3, mean=(0, 0, 0), std=(1, 1, 1)
    )


def test_accuracy_top1_top5():
    model = FixedScores([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # ranks class 0 first, class 6 last
    top1, top5 = accuracy(model, _loader([0, 0, 1, 4, 5, 6]))
    assert top1 == 100 * 2 / 6
    assert top5 == 100 * 4 / 6


def test_per_image_predictions_give_the_same_accuracy_and_round_trip_compactly(tmp_path):
    model = FixedScores([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    scored = predictions(model, _loader([0, 0, 1, 4, 5, 6]))
    assert scored.predicted.tolist() == [0] * 6 and scored.labels.tolist() == [0, 0, 1, 4, 5, 6]
    assert scored.correct.tolist() == [True, True, False, False, False, False]
    assert (scored.top1, scored.top5) == accuracy(model, _loader([0, 0, 1, 4, 5, 6]))
    assert scored.predicted.dtype == np.uint8  # 1 byte per image below 257 classes
    val = predictions(model, _loader([1, 0]))
    save_predictions(tmp_path / "p.npz", {"val": {"torch": val}, "test": {"torch": scored, "onnxruntime": scored}})
    loaded = load_predictions(tmp_path / "p.npz")  # the test split
    assert set(loaded) == {"labels", "torch", "onnxruntime"}
    assert np.array_equal(loaded["torch"], scored.predicted) and np.array_equal(loaded["labels"], scored.labels)
    assert load_predictions(tmp_path / "p.npz", "val")["labels"].tolist() == [1, 0]
    # A file from before validation splits holds the test split alone, unprefixed.
    np.savez_compressed(tmp_path / "old.npz", labels=scored.labels, **{"torch.predicted": scored.predicted})
    assert set(load_predictions(tmp_path / "old.npz")) == {"labels", "torch"}
    assert load_predictions(tmp_path / "old.npz", "val") == {}


def test_param_counts():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0].zero_()
    assert count_params(layer) == 15
    assert count_nonzero_params(layer) == 15 - 4 - int((layer.bias == 0).sum())


def test_macs_of_known_layers():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, (3, 10, 10)) == 8 * 3 * 3 * 3 * 10 * 10
    assert count_macs(nn.Linear(16, 5), (16,)) == 16 * 5


def test_latency_and_throughput_are_measured():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    p50, p90 = latency_ms(model, (3, 32, 32), threads=1, runs=9, warmup=2)
    assert 0 < p50 <= p90 < 1000
    assert throughput_ips(model, (3, 32, 32), batch_size=4, threads=1, runs=2) > 0
    assert torch.get_num_threads() >= 1


def test_evaluate_reports_every_metric(tiny_bundle):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    metrics = evaluate(model, tiny_bundle.test_loader(8), tiny_bundle.input_size, FAST)
    expected = {
        "top1",
        "top5",
        "params",
        "nonzero_params",
        "macs",
        "latency_ms_p50",
        "latency_ms_p90",
        "throughput_ips",
        "eval_threads",
    }
    assert expected <= set(metrics)
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["params"] == count_params(model) and metrics["macs"] > 0
