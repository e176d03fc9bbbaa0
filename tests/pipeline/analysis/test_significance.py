"""Significance tests: hand-computed McNemar, t intervals and Holm, bootstrap properties, verdicts on a
synthetic three-model case (one clearly better, two tied)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.analysis.significance import (
    best_or_tied,
    dominated_with_confidence,
    holm,
    is_correct,
    mcnemar_exact,
    mcnemar_exact_predictions,
    mean_ci,
    paired_bootstrap_diff,
    pairwise_comparisons,
    spread,
    verdict_matrix,
)


def _paired(both_right: int, a_only: int, b_only: int, both_wrong: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * both_right + [True] * a_only + [False] * b_only + [False] * both_wrong)
    b = np.array([True] * both_right + [False] * a_only + [True] * b_only + [False] * both_wrong)
    return a, b


# McNemar


def test_mcnemar_by_hand():
    a, b = _paired(both_right=50, a_only=1, b_only=9, both_wrong=40)
    result = mcnemar_exact(a, b)
    assert (result.b, result.c) == (1, 9)
    # P(X <= 1) for X ~ Bin(10, 1/2) is (1 + 10) / 1024, doubled for two sides
    assert result.p_value == pytest.approx(2 * (1 + 10) / 1024, abs=1e-12)
    assert result.p_value == pytest.approx(0.021484375, abs=1e-12)


def test_mcnemar_swapping_a_and_b_swaps_counts_keeps_p():
    a, b = _paired(both_right=5, a_only=1, b_only=9, both_wrong=3)
    forward, backward = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (backward.b, backward.c) == (forward.c, forward.b)
    assert backward.p_value == forward.p_value


@pytest.mark.parametrize("a_only, b_only", [(7, 7), (0, 0), (1, 1)])
def test_mcnemar_balanced_or_no_discordant_pairs_gives_p_one(a_only, b_only):
    a, b = _paired(both_right=10, a_only=a_only, b_only=b_only, both_wrong=10)
    assert mcnemar_exact(a, b).p_value == 1.0


def test_mcnemar_pools_discordant_counts_over_seeds():
    a0, b0 = _paired(both_right=3, a_only=1, b_only=4, both_wrong=2)
    a1, b1 = _paired(both_right=3, a_only=0, b_only=5, both_wrong=2)
    result = mcnemar_exact(np.stack([a0, a1]), np.stack([b0, b1]))
    assert (result.b, result.c) == (1, 9)
    assert result.p_value == pytest.approx(0.021484375, abs=1e-12)


def test_mcnemar_from_predictions_and_labels():
    labels = np.array([0, 1, 2, 3, 4, 5])
    predictions_a = np.array([0, 1, 2, 0, 0, 0])  # right on 0, 1, 2
    predictions_b = np.array([0, 9, 9, 3, 4, 0])  # right on 0, 3, 4
    assert is_correct(predictions_a, labels).tolist() == [True, True, True, False, False, False]
    result = mcnemar_exact_predictions(predictions_a, predictions_b, labels)
    assert (result.b, result.c) == (2, 2)


def test_mcnemar_rejects_predictions_passed_as_correctness():
    with pytest.raises(ValueError, match="bool"):
        mcnemar_exact(np.array([1, 2, 3]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


# mean, spread, t interval


def test_mean_ci_by_hand():
    interval = mean_ci([1.0, 2.0, 3.0])
    # with 2 degrees of freedom the t quantile has a closed form: t_p = (2p - 1) * sqrt(2 / (4p(1 - p)))
    t_975 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    assert t_975 == pytest.approx(4.302652729749464, abs=1e-12)
    half = t_975 * 1.0 / math.sqrt(3)  # sd of [1, 2, 3] is 1
    assert (interval.mean, interval.n) == (2.0, 3)
    assert interval.low == pytest.approx(2.0 - half, abs=1e-12)
    assert interval.high == pytest.approx(2.0 + half, abs=1e-12)


def test_mean_ci_agrees_with_scipy_ttest_interval():
    values = np.array([71.2, 70.4, 71.9, 70.8, 71.5])
    expected = stats.ttest_1samp(values, 0.0).confidence_interval(0.9)
    interval = mean_ci(values, confidence=0.9)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_one_seed_has_no_spread():
    interval = mean_ci([70.0])
    assert interval.mean == 70.0 and math.isnan(interval.low) and math.isnan(interval.high)
    assert not interval.excludes_zero()
    mean, std = spread([70.0])
    assert mean == 70.0 and math.isnan(std)


def test_spread_is_sample_std():
    assert spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_ci([5.0, 5.0]).low == mean_ci([5.0, 5.0]).high == 5.0


# paired bootstrap


def _correct(rng: np.random.Generator, accuracy: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape) < accuracy


def test_bootstrap_is_deterministic_for_a_seed_and_contains_the_observed_difference():
    rng = np.random.default_rng(0)
    a, b = _correct(rng, 0.75, (3, 500)), _correct(rng, 0.72, (3, 500))
    first = paired_bootstrap_diff(a, b, n_resamples=500, rng=np.random.default_rng(7))
    again = paired_bootstrap_diff(a, b, n_resamples=500, rng=np.random.default_rng(7))
    assert first == again
    assert first.mean == pytest.approx(100 * (a.mean() - b.mean()))
    assert first.low < first.mean < first.high
    assert first.n == 500


def test_bootstrap_of_identical_models_is_exactly_zero():
    a = _correct(np.random.default_rng(1), 0.7, (3, 400))
    interval = paired_bootstrap_diff(a, a.copy(), n_resamples=300, rng=2)
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_bootstrap_clear_difference_excludes_zero():
    images = np.arange(1000)
    a, b = images % 10 != 0, images % 2 == 0  # 90% against 50%
    interval = paired_bootstrap_diff(a, b, n_resamples=1000, rng=3)
    assert interval.mean == pytest.approx(40.0)
    assert interval.excludes_zero() and interval.low > 30


def test_bootstrap_width_matches_normal_approximation_for_one_seed():
    rng = np.random.default_rng(4)
    a, b = _correct(rng, 0.8, 4000), _correct(rng, 0.78, 4000)
    interval = paired_bootstrap_diff(a, b, n_resamples=2000, rng=5)
    per_image = a.astype(float) - b.astype(float)
    half_width = 100 * stats.norm.ppf(0.975) * per_image.std() / math.sqrt(per_image.size)
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_bootstrap_in_small_chunks_is_deterministic_and_sane(monkeypatch):
    import pipeline.analysis.significance as significance

    rng = np.random.default_rng(6)
    a, b = _correct(rng, 0.7, (2, 300)), _correct(rng, 0.6, (2, 300))
    # deterministic for a given chunk size; a smaller chunk changes the draws but not the distribution
    monkeypatch.setattr(significance, "_CHUNK_ELEMENTS", 300 * 7)
    chunked = paired_bootstrap_diff(a, b, n_resamples=1000, rng=8)
    assert chunked == paired_bootstrap_diff(a, b, n_resamples=1000, rng=8)
    assert chunked.low < chunked.mean < chunked.high


# Holm


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-12)


def test_holm_caps_at_one_and_keeps_order():
    assert holm([0.5, 0.2, 0.9]).tolist() == pytest.approx([1.0, 0.6, 1.0])
    assert holm([0.02]).tolist() == [0.02]
    assert holm([]).size == 0
    with pytest.raises(ValueError):
        holm([0.1, 1.5])


# pairwise comparisons and verdicts


def _three_models() -> dict[str, np.ndarray]:
    """'good' is right on ~90% of images, 'x' and 'y' on ~70% with equal discordant counts (a tie)."""
    rng = np.random.default_rng(10)
    seeds = []
    for _ in range(3):
        x = rng.random(3000) < 0.7
        wrong, right = np.flatnonzero(~x), np.flatnonzero(x)
        y = x.copy()
        y[wrong[:40]], y[right[:40]] = True, False  # 40 images each way
        good = x | (rng.random(3000) < 0.67)
        seeds.append((good, x, y))
    return {name: np.stack([s[i] for s in seeds]) for i, name in enumerate(["good", "x", "y"])}


def test_pairwise_comparisons_on_three_models():
    correct = _three_models()
    pairs = pairwise_comparisons(correct, n_resamples=500, rng=0)
    assert list(zip(pairs["a"], pairs["b"], strict=True)) == [("good", "x"), ("good", "y"), ("x", "y")]
    assert pairs["verdict"].tolist() == ["better", "better", "tied"]
    tie = pairs.iloc[2]
    assert tie["a_only_correct"] == tie["b_only_correct"] == 120 and tie["p_mcnemar"] == 1.0
    assert tie["ci_low_pp"] <= 0 <= tie["ci_high_pp"] and tie["diff_pp"] == 0
    assert pairs["p_holm"].tolist() == pytest.approx(holm(pairs["p_mcnemar"]).tolist())
    assert pairs["top1_a"].iloc[0] == pytest.approx(100 * correct["good"].mean())
    assert pairs["diff_pp"].iloc[0] == pytest.approx(pairs["top1_a"].iloc[0] - pairs["top1_b"].iloc[0])


def test_pairwise_comparisons_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        pairwise_comparisons({"a": np.ones((2, 5), bool), "b": np.ones((3, 5), bool)}, rng=0)


def test_verdict_matrix_reads_row_against_column():
    pairs = pairwise_comparisons(_three_models(), n_resamples=300, rng=0)
    matrix = verdict_matrix(pairs, ["x", "good", "y"])
    assert matrix.loc["good"].tolist() == ["better", "", "better"]
    assert matrix.loc["x"].tolist() == ["", "worse", "tied"]
    assert matrix.loc["y", "x"] == "tied"
    with pytest.raises(ValueError, match="no comparison"):
        verdict_matrix(pairs, ["x", "good", "unknown"])


def test_best_or_tied():
    correct = _three_models()
    result = best_or_tied(pairwise_comparisons(correct, n_resamples=300, rng=0))
    assert (result.leader, result.best, result.tied_with) == ("good", "good", ())
    assert set(result.p_holm) == {"x", "y"} and max(result.p_holm.values()) < 0.05

    without_good = pairwise_comparisons({k: correct[k] for k in ("x", "y")}, n_resamples=300, rng=0)
    top1 = {"x": 70.0, "y": 70.1}  # the caller's top-1 decides the leader
    result = best_or_tied(without_good, top1)
    assert (result.leader, result.best, result.tied_with) == ("y", None, ("x",))
    assert result.p_holm == {"x": 1.0}


def test_dominated_with_confidence():
    points = pd.DataFrame({
        "name": ["small_accurate", "big_worse", "small_worse", "cheap_overlap", "one_seed"],
        "top1_ci_low": [75.0, 70.0, 69.0, 74.0, float("nan")],
        "top1_ci_high": [76.0, 71.0, 73.0, 77.0, float("nan")],
        "artifact_bytes": [100, 400, 100, 50, 10],
        "latency_ms_p50": [2.0, 3.0, 2.0, 1.0, 1.0],
    })  # fmt: skip
    dominated = dominated_with_confidence(points, ["artifact_bytes", "latency_ms_p50"])
    # big_worse: small_accurate is above it and cheaper; small_worse: above it at equal cost;
    # cheap_overlap overlaps small_accurate and is cheaper; one_seed has no interval
    assert dominated == ["big_worse", "small_worse"]
