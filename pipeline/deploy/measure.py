"""Measuring an exported file in its runtime: accuracy on every split, batch-1 latency, batch throughput, file size.

The runtime counterpart of `pipeline.core.metrics`' torch measurements; names carry the runtime
(`onnxruntime.latency_ms_p50`). Pure functions: nothing here writes to disk or MLflow.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core.metrics import EvalConfig, Loader, Predictions, accuracy_metrics, classify
from pipeline.deploy import Predict, open_runtime, runtime_file_bytes, zipped_bytes


def predict_predictions(predict: Predict, loader: Loader, *, progress: bool = False) -> Predictions:
    """A runtime's `predict` (one batch -> logits) on every image of `loader`."""
    batches = tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not progress)
    return classify(
        (torch.from_numpy(np.asarray(predict(np.ascontiguousarray(images.numpy())))), labels)
        for images, labels in batches
    )


def predict_accuracy(predict: Predict, loader: Loader, *, progress: bool = False) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of a runtime's `predict` (one batch -> logits) over `loader`."""
    result = predict_predictions(predict, loader, progress=progress)
    return result.top1, result.top5


def predict_times_ms(predict: Predict, x: np.ndarray, *, runs: int, warmup: int) -> list[float]:
    """Wall time of each of `runs` calls of `predict(x)`, in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def p50_p90(times: Sequence[float]) -> tuple[float, float]:
    """Median and 90th percentile (nearest rank) of timings."""
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def runtime_metrics(
    runtime: str,
    file: Path,
    test_loader: Loader,
    input_size: tuple[int, ...],
    cfg: EvalConfig,
    *,
    threads: int,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy (whole test split), batch-1 p50/p90 latency and batch throughput of one exported file in one
    runtime; names carry the runtime (`onnxruntime.top1`). Accuracy runs on every core, timing on `threads`."""
    args = (runtime, file, {"test": test_loader}, input_size, cfg)
    return runtime_metrics_with_predictions(*args, threads=threads, progress=progress)[0]


def runtime_metrics_with_predictions(
    runtime: str,
    file: Path,
    loaders: Mapping[str, Loader],
    input_size: tuple[int, ...],
    cfg: EvalConfig,
    *,
    threads: int,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, Predictions]]:
    """`runtime_metrics` with accuracy on every split of `loaders`, and each split's per-image predictions."""
    predict = open_runtime(runtime, file, threads=os.cpu_count() or 1)
    scored = {split: predict_predictions(predict, loader, progress=progress) for split, loader in loaders.items()}
    one = np.random.default_rng(0).standard_normal((1, *input_size), dtype=np.float32)
    p50, p90 = p50_p90(predict_times_ms(open_runtime(runtime, file, threads=threads, batch_size=1), one,
                                        runs=cfg.latency_runs, warmup=cfg.warmup_runs))  # fmt: skip
    batch = np.random.default_rng(1).standard_normal((cfg.throughput_batch_size, *input_size), dtype=np.float32)
    batch_predict = open_runtime(runtime, file, threads=threads, batch_size=cfg.throughput_batch_size)
    batch_ms = statistics.median(predict_times_ms(batch_predict, batch, runs=cfg.throughput_runs, warmup=2))
    return {
        **accuracy_metrics(scored, runtime),
        f"{runtime}.latency_ms_p50": p50,
        f"{runtime}.latency_ms_p90": p90,
        f"{runtime}.throughput_ips": cfg.throughput_batch_size / (batch_ms / 1e3),
        f"{runtime}.file_bytes": float(runtime_file_bytes(file)),
        f"{runtime}.file_bytes_zip": float(zipped_bytes(file)),
        f"{runtime}.threads": float(threads),
    }, scored


def predict_side_by_side(
    predicts: Sequence[Predict], input_size: tuple[int, ...], *, rounds: int = 7, runs: int = 100, warmup: int = 10
) -> list[float]:
    """Batch-1 p50 latency (ms) of each runtime `predict`, the median over `rounds` interleaved rounds (as
    `latency_side_by_side` does for torch modules). Compare their ratios."""
    x = np.random.default_rng(0).standard_normal((1, *input_size), dtype=np.float32)
    samples: list[list[float]] = [[] for _ in predicts]
    for _ in range(rounds):
        for i, predict in enumerate(predicts):
            samples[i].append(statistics.median(predict_times_ms(predict, x, runs=runs, warmup=warmup)))
    return [statistics.median(s) for s in samples]


def speed_vs_input(
    runtime: str, file: Path, input_file: Path, input_size: tuple[int, ...], cfg: EvalConfig, *, threads: int,
    rounds: int = 3,
) -> dict[str, float]:  # fmt: skip
    """How much faster a stage's exported file runs than its input model's, both timed side by side in `runtime`
    (interleaved rounds, medians), at batch 1 and at the throughput batch size: `<runtime>.speedup_vs_input` and
    `<runtime>.throughput_speedup_vs_input` (input time / this time; below 1: slower). Figures each stage logs on
    its own come from different moments of a busy machine; these two are measured together."""
    out = {}
    for batch, key, runs in (
        (1, "speedup_vs_input", 30),
        (cfg.throughput_batch_size, "throughput_speedup_vs_input", 3),
    ):
        predicts = [open_runtime(runtime, f, threads=threads, batch_size=batch) for f in (input_file, file)]
        x = np.random.default_rng(2).standard_normal((batch, *input_size), dtype=np.float32)
        samples: list[list[float]] = [[], []]
        for _ in range(rounds):
            for i, predict in enumerate(predicts):
                samples[i].append(statistics.median(predict_times_ms(predict, x, runs=runs, warmup=2)))
        out[f"{runtime}.{key}"] = statistics.median(samples[0]) / statistics.median(samples[1])
    return out
