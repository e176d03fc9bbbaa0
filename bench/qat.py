"""Issue #5 benchmark: INT8 quantization-aware training against post-training quantization of the same
cached baseline (the default recipe model), on CIFAR-10; batch-1 and batch-64 CPU latency against fp32,
all measured side by side in one run.

    .venv/bin/python bench/qat.py

Goals (issue #5): the QAT int8 model at least 3.0x faster than fp32 at batch 1 on one thread, top-1
within 0.5 points of its input model, and at least as accurate as post-training quantization.
"""

from __future__ import annotations

import statistics

import torch
from common import Row, load_artifact, parse_args, run_all
from torch.utils import benchmark

VARIANTS = {
    "INT8 QAT (2 ep)": ("qat", []),
    # The same stage with no training: calibrate on 8 batches, convert (what a user would try first).
    "INT8 PTQ (calibration only)": ("qat", ["stages[0].qat.epochs=0"]),
}
BATCH = 64


def side_by_side_batch_ms(rows: list[Row], rounds: int, runs: int) -> list[float]:
    """Median over interleaved rounds of each artifact's median batch-64 forward time (ms), 1 thread."""
    models = [load_artifact(r.artifact) for r in rows]
    x = torch.randn(BATCH, *models[0].pretrained_cfg["input_size"])
    samples: list[list[float]] = [[] for _ in rows]
    timers = [benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=1) for m in models]
    with torch.inference_mode():
        for timer in timers:
            timer.timeit(2)
        for _ in range(rounds):
            for i, timer in enumerate(timers):
                samples[i].append(statistics.median(timer.timeit(1).times[0] * 1e3 for _ in range(runs)))
    return [statistics.median(s) for s in samples]


def batch_table(rows: list[Row], batch_ms: list[float]) -> str:
    base = rows[0]
    lines = [
        f"| variant | top1 % | Δ top1 vs fp32 (pts) | batch-1 speed-up | batch-{BATCH} ms | batch-{BATCH} speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, ms in zip(rows, batch_ms, strict=True):
        lines.append(
            f"| {row.label} | {row.metrics['top1']:.2f} | {row.metrics['top1'] - base.metrics['top1']:+.2f} | "
            f"{base.latency_p50_side_by_side / row.latency_p50_side_by_side:.2f}x | {ms:.1f} | "
            f"{batch_ms[0] / ms:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args(__doc__)
    rows = run_all(VARIANTS, args, "bench/qat.py")  # prints the batch-1 table (side by side, 1 thread)
    batch_ms = side_by_side_batch_ms(rows, rounds=args.rounds, runs=max(3, args.runs // 20))
    print(f"\nbatch {BATCH}, 1 thread, median of {args.rounds} interleaved rounds:\n")
    print(batch_table(rows, batch_ms))


if __name__ == "__main__":
    main()
