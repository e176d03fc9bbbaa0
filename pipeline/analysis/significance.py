"""Whether one compressed model is really more accurate than another: seed spread, paired tests, verdicts.

Pure functions on numpy arrays (no torch, no MLflow). The inputs are per-image correctness arrays, bool, of
shape (seeds, images) (a 1-D array is one seed): entry [k, i] says whether the model trained with seed k
classified test image i correctly. Every model must be evaluated on the same test images in the same order,
which is what makes the tests paired. Accuracies and their differences are in percent / percentage points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

VERDICTS = ("better", "worse", "tied")
_FLIP = {"better": "worse", "worse": "better", "tied": "tied"}
# Bootstrap work per chunk (resamples x images); bounds memory to ~32 MB whatever n_resamples is.
_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class Interval:
    """An estimate with a confidence interval, in the units of its inputs; `n` observations behind it."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """Whether the whole interval lies on one side of 0 (False when the bounds are NaN)."""
        return bool(self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: `b` pairs where only A is right, `c` where only B is right, two-sided `p_value`."""

    b: int
    c: int
    p_value: float


@dataclass(frozen=True)
class BestOrTied:
    """The ordering with the highest mean top-1 (`leader`), the others it is not significantly better than
    (`tied_with`, highest top-1 first) and the Holm-adjusted p of its comparison with each other ordering."""

    leader: str
    tied_with: tuple[str, ...]
    p_holm: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str | None:
        """The leader when it beats every other ordering significantly, else None (no single best)."""
        return None if self.tied_with else self.leader


def spread(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of per-seed values, in their units.

    The standard deviation is NaN for a single seed: one run cannot show the run-to-run spread.
    """
    x = _as_1d(values)
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    return float(x.mean()), std


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of per-seed values (e.g. top-1 in percent) and its Student-t confidence interval, same units.

    The interval is mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n) with s the sample standard deviation:
    where the mean over seeds would fall on repeated sets of n seeds. With n = 1 the bounds are NaN, since
    one seed gives no estimate of the spread; identical values give a zero-width interval.
    """
    x = _as_1d(values)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, float("nan"), float("nan"), int(x.size))
    half = float(stats.t.ppf((1 + confidence) / 2, df=x.size - 1)) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size))


def is_correct(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image correctness from predicted classes (..., images) and true labels (images,), bool."""
    return np.asarray(predictions) == np.asarray(labels)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact (binomial) McNemar test of "A and B have the same accuracy" on paired per-image correctness.

    Only discordant pairs carry information: b = images A gets right and B wrong, c = the reverse. Under
    the null each discordant pair is a fair coin, so p = scipy.stats.binomtest(min(b, c), b + c, 0.5),
    two-sided; p = 1 when there is no discordant pair. Arrays of shape (seeds, images) pool the counts
    over seeds, pairing seed k of A with seed k of B.
    """
    a, b_ = _check_correct(correct_a, "correct_a"), _check_correct(correct_b, "correct_b")
    if a.shape != b_.shape:
        raise ValueError(f"correct_a and correct_b must have the same shape, got {a.shape} and {b_.shape}")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    p = 1.0 if b + c == 0 else float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)
    return McNemar(b, c, min(p, 1.0))


def mcnemar_exact_predictions(predictions_a: np.ndarray, predictions_b: np.ndarray, labels: np.ndarray) -> McNemar:
    """`mcnemar_exact` from predicted classes of A and B and the true labels of the same test images."""
    return mcnemar_exact(is_correct(predictions_a, labels), is_correct(predictions_b, labels))


def paired_bootstrap_diff(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | int,
) -> Interval:
    """Top-1 of A minus top-1 of B in percentage points, with a paired percentile-bootstrap interval.

    Each resample draws seeds with replacement (seed k of A stays paired with seed k of B, which is valid
    whether or not runs sharing a seed are correlated), then test images with replacement, the same image
    indices for A and B and for every drawn seed (one test set serves all runs). The interval covers the
    difference between the two models over new seeds and a new test set of the same size. `mean` is the
    observed difference, `n` the number of test images. scipy.stats.bootstrap resamples one level only and
    is far slower here, hence this vectorised version; the same `rng` seed gives the same interval.
    """
    a, b = _as_seeds_images(correct_a, "correct_a"), _as_seeds_images(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must have the same (seeds, images) shape: {a.shape}, {b.shape}")
    gen = np.random.default_rng(rng)
    diff = a.astype(np.float32) - b.astype(np.float32)  # per seed and image: -1, 0 or +1
    n_seeds, n_images = diff.shape
    resampled = np.empty(n_resamples)
    chunk = max(1, _CHUNK_ELEMENTS // n_images)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        seeds = gen.integers(0, n_seeds, size=(rows, n_seeds))
        seed_weights = (seeds[:, :, None] == np.arange(n_seeds)).sum(axis=1, dtype=np.float32) / n_seeds
        per_image = seed_weights @ diff  # (rows, images): mean over the drawn seeds
        # int32 indices are ~5x faster to draw; a chunk holds at most _CHUNK_ELEMENTS of them
        images = gen.integers(0, n_images, size=(rows, n_images), dtype=np.int32)
        images += np.arange(rows, dtype=np.int32)[:, None] * n_images  # index into the flattened rows
        resampled[start : start + rows] = per_image.ravel()[images].sum(axis=1, dtype=np.float64)
    resampled *= 100.0 / n_images
    tail = 100.0 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    observed = 100.0 * (a.mean() - b.mean())
    return Interval(float(observed), float(low), float(high), n_images)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order, monotone and capped at 1.

    Sorted ascending, the i-th smallest of m p-values (i from 0) is multiplied by m - i, then a running
    maximum keeps the adjusted values in the same order as the raw ones. Rejecting where adjusted p < alpha
    bounds the family-wise error rate at alpha. scipy has no Holm correction: scipy.stats.false_discovery_control
    is Benjamini-Hochberg / Benjamini-Yekutieli, which controls the false discovery rate instead.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p_values must be a 1-D sequence of numbers in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def pairwise_comparisons(
    correct: Mapping[str, np.ndarray],
    *,
    alpha: float = 0.05,
    n_resamples: int = 2000,
    rng: np.random.Generator | int,
) -> pd.DataFrame:
    """One row per unordered pair (a, b) of models, in the mapping's order, comparing their top-1.

    Columns: a, b; top1_a, top1_b (percent, mean over seeds); diff_pp (a - b, percentage points) and
    ci_low_pp / ci_high_pp, its paired bootstrap interval at confidence 1 - alpha; a_only_correct /
    b_only_correct and p_mcnemar, the exact McNemar test on the discordant counts pooled over seeds (seed k of
    a against seed k of b; pooling treats the seeds' pairs as independent, which overstates the evidence when
    seeds agree image by image, hence the bootstrap condition below); p_holm, p_mcnemar Holm-adjusted across
    all pairs; verdict "better" (a beats b: p_holm < alpha and the interval lies above 0), "worse" (the
    mirror case) or "tied". All arrays must share one (seeds, images) shape.
    """
    arrays = {name: _as_seeds_images(values, f"correct[{name!r}]") for name, values in correct.items()}
    shapes = {name: values.shape for name, values in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"every model needs the same (seeds, images) shape, got {shapes}")
    gen = np.random.default_rng(rng)
    rows = [_compare_pair(a, b, arrays, alpha, n_resamples, gen) for a, b in combinations(arrays, 2)]
    frame = pd.DataFrame(rows, columns=_PAIR_COLUMNS)
    frame["p_holm"] = holm(frame["p_mcnemar"].to_numpy())
    frame["verdict"] = [_verdict(row, alpha) for row in frame.itertuples()]
    return frame


_PAIR_COLUMNS = ["a", "b", "top1_a", "top1_b", "diff_pp", "ci_low_pp", "ci_high_pp", "a_only_correct",
                 "b_only_correct", "p_mcnemar"]  # fmt: skip


def _compare_pair(a: str, b: str, arrays: Mapping[str, np.ndarray], alpha: float, n_resamples: int, gen) -> dict:
    interval = paired_bootstrap_diff(arrays[a], arrays[b], n_resamples=n_resamples, confidence=1 - alpha, rng=gen)
    test = mcnemar_exact(arrays[a], arrays[b])
    return {"a": a, "b": b, "top1_a": 100.0 * arrays[a].mean(), "top1_b": 100.0 * arrays[b].mean(),
            "diff_pp": interval.mean, "ci_low_pp": interval.low, "ci_high_pp": interval.high,
            "a_only_correct": test.b, "b_only_correct": test.c, "p_mcnemar": test.p_value}  # fmt: skip


def _verdict(row, alpha: float) -> str:
    if row.p_holm < alpha and row.ci_low_pp > 0:
        return "better"
    if row.p_holm < alpha and row.ci_high_pp < 0:
        return "worse"
    return "tied"


def verdict_matrix(pairs: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Square table of verdicts read "row vs column" ("better": the row model beats the column model);
    the diagonal is "". `pairs` is `pairwise_comparisons`' frame; each pair may appear in either order."""
    verdicts = {}
    for row in pairs.itertuples():
        verdicts[row.a, row.b] = row.verdict
        verdicts[row.b, row.a] = _FLIP[row.verdict]
    missing = [(a, b) for a, b in combinations(names, 2) if (a, b) not in verdicts]
    if missing:
        raise ValueError(f"pairs has no comparison for {missing}")
    cells = [["" if a == b else verdicts[a, b] for b in names] for a in names]
    return pd.DataFrame(cells, index=list(names), columns=list(names))


def best_or_tied(pairs: pd.DataFrame, top1_by_name: Mapping[str, float] | None = None) -> BestOrTied:
    """The highest mean top-1 model, called best only when it is significantly better than every other.

    `top1_by_name` (percent) defaults to the top1_a / top1_b columns of `pairs`. `tied_with` lists the
    models the leader does not beat (verdict other than "better"), highest top-1 first; `p_holm` gives the
    adjusted p-value of the leader against each other model.
    """
    top1 = dict(top1_by_name) if top1_by_name is not None else _top1_from_pairs(pairs)
    leader = max(top1, key=top1.__getitem__)
    matrix = verdict_matrix(pairs, list(top1))
    p_holm = {}
    for row in pairs.itertuples():
        if leader in (row.a, row.b):
            p_holm[row.b if row.a == leader else row.a] = float(row.p_holm)
    others = sorted((name for name in top1 if name != leader), key=lambda name: -top1[name])
    tied = tuple(name for name in others if matrix.loc[leader, name] != "better")
    return BestOrTied(leader, tied, p_holm)


def _top1_from_pairs(pairs: pd.DataFrame) -> dict[str, float]:
    top1 = dict(zip(pairs["a"], pairs["top1_a"], strict=True))
    top1.update(zip(pairs["b"], pairs["top1_b"], strict=True))
    if not top1:
        raise ValueError("pairs is empty: no model to rank")
    return top1


def dominated_with_confidence(
    points: pd.DataFrame,
    costs: Sequence[str],
    *,
    name: str = "name",
    top1_low: str = "top1_ci_low",
    top1_high: str = "top1_ci_high",
) -> list[str]:
    """Names of the models that another model beats with confidence, in `points`' order.

    Model i is dominated with confidence when some model j has a top-1 interval entirely above i's
    (`top1_low` of j > `top1_high` of i, percent) and costs no more on every `costs` column (lower is
    better: bytes, ms, ...). Costs are compared as given (their means): only accuracy carries an interval
    here. Rows with NaN bounds (a single seed) are never dominated and never dominate.
    """
    low, high = points[top1_low].to_numpy(dtype=float), points[top1_high].to_numpy(dtype=float)
    cost = points[list(costs)].to_numpy(dtype=float)
    if np.isnan(cost).any():
        raise ValueError(f"cost columns {list(costs)} contain NaN; drop incomplete rows first")
    accuracy_above = low[:, None] > high[None, :]  # [j, i]: j's interval lies above i's (False with NaN)
    no_costlier = (cost[:, None, :] <= cost[None, :, :]).all(axis=2)
    dominated = (accuracy_above & no_costlier).any(axis=0)
    return [str(n) for n, flag in zip(points[name], dominated, strict=True) if flag]


def _as_1d(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or np.isnan(x).any():
        raise ValueError(f"values must be a non-empty 1-D sequence of numbers, got {values!r}")
    return x


def _check_correct(values: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values)
    if x.dtype != bool:
        raise ValueError(f"{what} must be a bool array of per-image correctness (see is_correct), got {x.dtype}")
    return x


def _as_seeds_images(values: np.ndarray, what: str) -> np.ndarray:
    x = _check_correct(values, what)
    x = x[None, :] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{what} must have shape (seeds, images) or (images,), got {np.shape(values)}")
    return x
