"""Pareto frontiers: exact small cases, and agreement with a brute-force definition on random points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.pareto import frontier, frontiers, pareto_mask


def test_two_objectives_by_hand():
    # (accuracy up, size down)
    points = np.array([[80, 20], [79, 5], [78, 1], [80.5, 4], [77, 1], [70, 30]])
    assert pareto_mask(points, [True, False]).tolist() == [False, False, True, True, False, False]


def test_equal_points_do_not_dominate_each_other():
    points = np.array([[1.0, 1.0], [1.0, 1.0], [0.5, 2.0]])
    assert pareto_mask(points, [True, False]).tolist() == [True, True, False]


def test_single_point_and_nan():
    assert pareto_mask(np.array([[3.0, 4.0]]), [True, True]).tolist() == [True]
    with pytest.raises(ValueError, match="NaN"):
        pareto_mask(np.array([[1.0, np.nan]]), [True, True])
    with pytest.raises(ValueError, match="n x 2"):
        pareto_mask(np.array([1.0, 2.0]), [True, True])


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(40, 3)).astype(float)  # small ints: many ties
    maximize = [True, False, False]
    costs = points * np.where(maximize, -1, 1)
    expected = [
        not any((costs[j] <= costs[i]).all() and (costs[j] < costs[i]).any() for j in range(len(points)))
        for i in range(len(points))
    ]
    assert pareto_mask(points, maximize).tolist() == expected


def test_frontiers_names_every_pair():
    frame = pd.DataFrame(
        {"top1": [80, 79, 78, 80.5, 77], "artifact_bytes": [20, 5, 1, 4, 1], "latency_ms_p50": [4, 1.5, 1.4, 4, 1.3]},
        index=list("abcde"),
    )
    out = frontiers(frame)
    assert list(out.columns) == [
        "pareto",
        "pareto_top1__artifact_bytes",
        "pareto_top1__latency_ms_p50",
        "pareto_artifact_bytes__latency_ms_p50",
    ]
    assert out.index[out.pareto].tolist() == ["b", "c", "d", "e"]
    assert out.index[out.pareto_top1__artifact_bytes].tolist() == ["c", "d"]
    assert frontier(frame, {"latency_ms_p50": "min"}).tolist() == [False, False, False, False, True]
