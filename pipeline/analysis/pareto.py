"""Pareto frontiers: which models no other model beats on every objective. Pure functions on arrays and frames."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Literal

import numpy as np
import pandas as pd

Direction = Literal["max", "min"]
# The report's objectives: accuracy up, deployable size and batch-1 latency down.
OBJECTIVES: dict[str, Direction] = {"top1": "max", "artifact_bytes": "min", "latency_ms_p50": "min"}


def pareto_mask(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `values` (n points x k objectives).

    A point is dominated when another is at least as good on every objective and better on one; equal
    points do not dominate each other, so duplicates are both kept or both dropped.
    """
    points = np.asarray(values, dtype=float)
    if points.ndim != 2 or points.shape[1] != len(maximize):
        raise ValueError(f"values must be n x {len(maximize)}, got shape {points.shape}")
    if np.isnan(points).any():
        raise ValueError("values contain NaN; drop incomplete rows first")
    signs = np.where(maximize, -1.0, 1.0)  # minimise everything
    costs = points * signs
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)  # [j, i]: j no worse than i everywhere
    better = (costs[:, None, :] < costs[None, :, :]).any(axis=2)
    dominated = (no_worse & better).any(axis=0)
    return ~dominated


def frontier(frame: pd.DataFrame, objectives: Mapping[str, Direction] = OBJECTIVES) -> pd.Series:
    """Whether each row of `frame` is on the Pareto frontier of the given columns."""
    columns = list(objectives)
    mask = pareto_mask(frame[columns].to_numpy(), [objectives[c] == "max" for c in columns])
    return pd.Series(mask, index=frame.index, name="pareto")


def pair_column(a: str, b: str, objectives: Mapping[str, Direction] = OBJECTIVES) -> str:
    """The `frontiers` column of the 2-D frontier of objectives `a` and `b` (in either order)."""
    first, second = sorted((a, b), key=list(objectives).index)
    return f"pareto_{first}__{second}"


def frontiers(frame: pd.DataFrame, objectives: Mapping[str, Direction] = OBJECTIVES) -> pd.DataFrame:
    """Columns `pareto` (all objectives) and `pair_column(a, b)` for every pair, one row per row of `frame`."""
    out = pd.DataFrame({"pareto": frontier(frame, objectives)})
    for a, b in combinations(objectives, 2):
        out[pair_column(a, b, objectives)] = frontier(frame, {a: objectives[a], b: objectives[b]})
    return out


def hypervolume(values: np.ndarray, maximize: list[bool], reference: np.ndarray, scale: np.ndarray) -> float:
    """The volume of objective space that the points of `values` (n x k) dominate up to `reference`, each objective
    first divided by `scale` so that bytes and milliseconds weigh alike (a larger frontier is a larger number). Points
    no better than the reference on every objective add nothing. Exact (WFG), from Optuna's hypervolume module."""
    from optuna._hypervolume import compute_hypervolume

    points = np.asarray(values, dtype=float).reshape(-1, len(maximize))
    signs = np.where(maximize, -1.0, 1.0)  # minimise everything
    costs = points * signs / scale
    ref = np.asarray(reference, dtype=float) * signs / scale
    inside = (costs < ref).all(axis=1)
    if not inside.any():
        return 0.0
    return float(compute_hypervolume(costs[inside], ref))
