"""Issue #14 benchmark: how long one paired comparison of two models takes on stored predictions (no model runs):
the exact McNemar test plus the paired bootstrap interval (images and seeds resampled), as the sweep report runs
them for every pair of orderings.

    .venv/bin/python bench/significance.py [--images 10000] [--seeds 3] [--resamples 2000] [--repeats 7]

The inputs are per-image correctness arrays of CIFAR-10's size (two models ~80 % accurate, agreeing on most
images, like two compressed orderings); the work does not depend on which images are right. Goal (issue #14):
well under a second per pair.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.significance import mcnemar_exact, paired_bootstrap_diff  # noqa: E402


def pair(images: int, seeds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated correctness arrays of shape (seeds, images)."""
    base = rng.random((seeds, images)) < 0.8
    flip = rng.random((seeds, images)) < 0.08
    return base, base ^ flip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    a, b = pair(args.images, args.seeds, np.random.default_rng(0))
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        mcnemar_exact(a, b)
        paired_bootstrap_diff(a, b, n_resamples=args.resamples, rng=repeat)
        times.append(time.perf_counter() - start)
    print(
        f"{args.images} images x {args.seeds} seeds, {args.resamples} resamples: per pair median "
        f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}) over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
