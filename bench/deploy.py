"""Issue #13 benchmark: the models a user ships, timed in the runtimes they ship on, side by side.

Runs (or reuses from the cache) the baseline, `qat` and `prune-qat-distill` recipes (the default recipe
model, CIFAR-10), then loads each stage's exported files (ONNX, OpenVINO IR) and its torch artifact and
times them all in one process: batch 1 and batch 64, the configured threads, interleaved rounds (every model
in every runtime once per round), medians. Ratios are read within one runtime and one batch size.

    .venv/bin/python bench/deploy.py [--rounds 7] [--threads 1]

Goals (issue #13): `qat` OpenVINO int8 vs baseline OpenVINO fp32 >= 3x at batch 64 and >= 2.5x at batch 1;
ONNX Runtime int8 vs fp32 >= 1.8x at batch 64; prune-qat-distill in the fastest runtime vs the baseline there
>= 8x at batch 64, top-1 within 1 point; exported top-1 within 0.1 (fp32) / 0.3 (int8) points of torch;
export and runtime evaluation <= 30 s a stage.
"""

from __future__ import annotations

import statistics
import sys

import numpy as np
import torch
from common import Row, load_artifact, machine, parse_args
from torch.utils import benchmark

from pipeline.deploy import open_runtime
from pipeline.deploy.measure import predict_times_ms
from pipeline.recipe import load_recipe
from pipeline.run.runner import Runner

RUNTIMES = ("torch", "onnxruntime", "openvino")
BATCHES = (1, 64)


def rows_of(recipes: list[str], overrides: list[str]) -> list[Row]:
    """The baseline, then every stage of each recipe (its intermediate models too), each once."""
    rows: list[Row] = []
    seen = set()
    for recipe in recipes:
        summary = Runner(load_recipe(recipe, overrides), progress=sys.stderr.isatty()).run()
        for result in summary.results:
            if result.key in seen:
                continue
            seen.add(result.key)
            label = "baseline (fp32)" if result.index == 0 else f"{recipe}: {result.name}"
            rows.append(Row(label, result.metrics, result.artifact_path))
    return rows


def predictors(row: Row, batch: int, threads: int) -> dict[str, object]:
    """runtime -> a callable on one input batch (torch: the artifact in eager mode, inference mode)."""
    deploy = row.artifact.parent / "deploy-opset18"
    model = load_artifact(row.artifact)
    timer_x = torch.zeros(batch, *model.pretrained_cfg["input_size"])
    torch_timer = benchmark.Timer("m(x)", globals={"m": model, "x": timer_x}, num_threads=threads)
    return {
        "torch": torch_timer,
        "onnxruntime": open_runtime("onnxruntime", deploy / "model.onnx", threads=threads, batch_size=batch),
        "openvino": open_runtime("openvino", deploy / "openvino" / "model.xml", threads=threads, batch_size=batch),
    }


def side_by_side(rows: list[Row], threads: int, rounds: int) -> dict[tuple[int, str, int], float]:
    """(row index, runtime, batch) -> median ms over `rounds` interleaved rounds of each one's median call."""
    samples: dict[tuple[int, str, int], list[float]] = {}
    runs = {1: 100, 64: 10}
    setups = {(i, b): predictors(r, b, threads) for i, r in enumerate(rows) for b in BATCHES}
    size = tuple(load_artifact(rows[0].artifact).pretrained_cfg["input_size"])
    inputs = {b: np.random.default_rng(0).standard_normal((b, *size), dtype=np.float32) for b in BATCHES}
    with torch.inference_mode():
        for _ in range(rounds):
            for (i, batch), runtimes in setups.items():
                for runtime, run in runtimes.items():
                    if runtime == "torch":
                        run.timeit(2)
                        ms = statistics.median(run.timeit(1).times[0] * 1e3 for _ in range(runs[batch]))
                    else:
                        ms = statistics.median(predict_times_ms(run, inputs[batch], runs=runs[batch], warmup=3))
                    samples.setdefault((i, runtime, batch), []).append(ms)
    return {k: statistics.median(v) for k, v in samples.items()}


def tables(rows: list[Row], ms: dict[tuple[int, str, int], float]) -> str:
    lines = [
        "| model | top-1 torch | top-1 ORT | top-1 OV | runtime file (ORT / OV) | export + eval s |"
        + "".join(f" {r} b{b} ms (× baseline) |" for b in BATCHES for r in RUNTIMES),
        "| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (len(BATCHES) * len(RUNTIMES)),
    ]
    for i, row in enumerate(rows):
        m = row.metrics
        cells = "".join(
            f" {ms[(i, r, b)]:.3f} ({ms[(0, r, b)] / ms[(i, r, b)]:.2f}×) |" for b in BATCHES for r in RUNTIMES
        )
        lines.append(
            f"| {row.label} | {m['top1']:.2f} | {m['onnxruntime.top1']:.2f} | {m['openvino.top1']:.2f} | "
            f"{m['onnxruntime.file_bytes']:,.0f} / {m['openvino.file_bytes']:,.0f} | "
            f"{m['deploy_export_seconds'] + m['deploy_eval_seconds']:.1f} |{cells}"
        )
    return "\n".join(lines)


def main() -> None:
    def extra(parser):
        parser.add_argument("--threads", type=int, default=1, help="threads of every runtime (default 1)")
        parser.add_argument("--recipes", nargs="*", default=["qat", "prune-qat-distill"], help="recipes to include")

    args = parse_args(__doc__, extra)
    rows = rows_of(args.recipes, args.set)
    ms = side_by_side(rows, args.threads, args.rounds)
    print(f"\nbench/deploy.py {' '.join(sys.argv[1:])}\nmachine: {machine()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), median of {args.rounds} "
          "interleaved rounds (batch 1: 100 calls, batch 64: 10 calls a round)\n")  # fmt: skip
    print(tables(rows, ms))


if __name__ == "__main__":
    main()
