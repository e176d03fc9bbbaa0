"""Issue #26: what the search pruner's per-epoch probe costs: seconds to score `--images` validation images with the
default model (resnet10t at 32 px, channels_last as the training loop leaves it), median of `--rounds`.

    .venv/bin/python bench/probe_cost.py [--images 2000] [--rounds 5]

Compare with the training epoch times the loop logs (BENCHMARKS.md: 40-53 s per epoch for the same model here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402

from pipeline.core.data import load_data  # noqa: E402
from pipeline.core.metrics import epoch_validation  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.run.runner import default_cache_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    recipe = load_recipe("baseline-converged")
    data = load_data(recipe.data, recipe.model, cache_dir=default_cache_dir() / "datasets")
    model = timm.create_model(recipe.model.name, num_classes=data.num_classes).to(memory_format=torch.channels_last)
    probe = epoch_validation(data.with_val_subset(args.images).eval_loader("val"), "cpu")
    probe(model)  # warm-up
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        probe(model)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"machine: {machine()}\nprobe of {args.images} validation images: median {median:.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}) over {args.rounds} rounds, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
