"""Issue #37: int8 through PT2E (this checkout) against FX graph mode (`--against`: a checkout from before PT2E, e.g.
`git worktree add ../fx-main b49c01d`), on the shipped `qat` recipe (resnet10t, CIFAR-10) and INQ then int8.

Both checkouts run the same recipes in their own processes, sharing one stage cache (PIPELINE_CACHE_DIR), so they
start from the same cached baseline (and INQ) and differ only in the int8 flow. Then, in this one process, each
exported model is timed in ONNX Runtime and OpenVINO at batch 1 and 64, one thread, every model in every runtime once
per round, interleaved, medians over the rounds; ratios are read within a runtime and a batch size.

    .venv/bin/python bench/int8_backends.py --against ../fx-main [--seeds 0 1 2] [--rounds 7]

Goals (issue #37): PT2E top-1 within ±0.3 points of FX; batch-1 and batch-64 latency in both runtimes no worse than
1.05x FX's; INQ then int8 exact where FX was (int8_inq_exact_layers).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import machine, parse_args
from scipy import stats

from pipeline.deploy import open_runtime
from pipeline.deploy.measure import predict_times_ms

HERE = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")
BATCHES = (1, 64)
RUNTIMES = ("onnxruntime", "openvino")
RUNS = {1: 100, 64: 10}
INQ_THEN_PTQ = """name: inq-then-int8
extends: inq
stages:  # the shipped inq recipe's stage (reused from the cache where it ran), then post-training int8
  - inq: {bits: 5, accumulated_portions: [0.5, 0.75, 0.875, 1.0], epochs: 1, lr: 0.01, label_smoothing: 0.1}
  - qat: {epochs: 0, calibration_batches: 8}
"""
RUN = """import json, sys
from pipeline.recipe import load_recipe
from pipeline.run.runner import Runner
summary = Runner(load_recipe(sys.argv[1], sys.argv[2:]), progress=False).run()
first, last = summary.results[0], summary.results[-1]
print("RESULT " + json.dumps({"metrics": last.metrics, "baseline": first.metrics,
                              "deploy": str(last.artifact_path.parent / "deploy-opset18"),
                              "baseline_deploy": str(first.artifact_path.parent / "deploy-opset18")}))
"""


def run_in(checkout: Path, recipe: str, overrides: list[str]) -> dict:
    """Run `recipe` with `checkout`'s code in its own process (the shared cache reuses what both have run)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", RUN, recipe, *overrides], cwd=checkout, env=env, text=True,
                          capture_output=True)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{checkout}: {recipe} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def timings(deploys: dict[str, Path], size: tuple[int, ...], rounds: int) -> dict[tuple[str, str, int], float]:
    """(label, runtime, batch) -> median over interleaved rounds of each model's median call, in ms."""
    files = {"onnxruntime": "model.onnx", "openvino": "openvino/model.xml"}
    predicts = {(label, r, b): open_runtime(r, Path(d) / files[r], threads=1, batch_size=b)
                for label, d in deploys.items() for r in RUNTIMES for b in BATCHES}  # fmt: skip
    inputs = {b: np.random.default_rng(0).standard_normal((b, *size), dtype=np.float32) for b in BATCHES}
    samples: dict[tuple[str, str, int], list[float]] = {k: [] for k in predicts}
    for _ in range(rounds):
        for (label, runtime, batch), predict in predicts.items():
            times = predict_times_ms(predict, inputs[batch], runs=RUNS[batch], warmup=3)
            samples[(label, runtime, batch)].append(statistics.median(times))
    return {k: statistics.median(v) for k, v in samples.items()}


def interval(diffs: list[float]) -> str:
    """Mean of paired differences with its 95 % t interval over seeds."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def accuracy_table(fx: list[dict], pt2e: list[dict], seeds: list[int]) -> str:
    lines = ["| metric | " + " | ".join(f"FX s{s} | PT2E s{s}" for s in seeds) + " | PT2E - FX (95 % CI over seeds) |",
             "| --- |" + " ---: | ---: |" * len(seeds) + " ---: |"]  # fmt: skip
    for key in ("val_top1", "top1", "onnxruntime.val_top1", "onnxruntime.top1", "openvino.val_top1", "openvino.top1"):
        cells = " | ".join(f"{a['metrics'][key]:.2f} | {b['metrics'][key]:.2f}" for a, b in zip(fx, pt2e, strict=True))
        diffs = [b["metrics"][key] - a["metrics"][key] for a, b in zip(fx, pt2e, strict=True)]
        lines.append(f"| {key} | {cells} | {interval(diffs)} |")
    return "\n".join(lines)


def latency_table(ms: dict[tuple[str, str, int], float]) -> str:
    lines = ["| runtime | batch | fp32 baseline ms | FX int8 ms | PT2E int8 ms | PT2E / FX |", "| --- | ---: |"
             + " ---: |" * 4]  # fmt: skip
    for runtime in RUNTIMES:
        for batch in BATCHES:
            base, fx, pt2e = (ms[(label, runtime, batch)] for label in ("fp32", "fx", "pt2e"))
            lines.append(f"| {runtime} | {batch} | {base:.3f} | {fx:.3f} | {pt2e:.3f} | {pt2e / fx:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    def extra(parser):
        parser.add_argument("--against", type=Path, required=True, help="a checkout with the FX int8 flow")
        parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="stage seeds of the qat recipe")
        parser.add_argument("--no-inq", action="store_true", help="skip INQ then int8 (trains INQ once, ~10 min)")

    args = parse_args(__doc__, extra)
    fx = [run_in(args.against, "qat", [f"stage_seed={s}", *args.set]) for s in args.seeds]
    pt2e = [run_in(HERE, "qat", [f"stage_seed={s}", *args.set]) for s in args.seeds]
    inq = {} if args.no_inq else inq_then_int8(args)
    log.info("all runs done; timing the exported models side by side (keep the machine idle)")
    deploys = {"fp32": fx[0]["baseline_deploy"], "fx": fx[0]["deploy"], "pt2e": pt2e[0]["deploy"]}
    ms = timings(deploys, (3, 32, 32), args.rounds)
    print(f"\nbench/int8_backends.py {' '.join(sys.argv[1:])}\nmachine: {machine()}; latency: 1 thread, median of "
          f"{args.rounds} interleaved rounds (batch 1: 100 calls, batch 64: 10 calls a round), stage seed "
          f"{args.seeds[0]}'s models\n")  # fmt: skip
    print(accuracy_table(fx, pt2e, args.seeds), "\n")
    print(latency_table(ms), "\n")
    for name, result in inq.items():
        m = result["metrics"]
        print(f"INQ 5-bit then int8 (PTQ), {name}: exact layers {m.get('int8_inq_exact_layers', 0):.0f}, inexact "
              f"{m.get('int8_inq_inexact_layers', 0):.0f} ({m.get('int8_inq_inexact_weights', 0):.0f} weights); "
              f"val top-1 {m['val_top1']:.2f}, ORT {m['onnxruntime.val_top1']:.2f}")  # fmt: skip


def inq_then_int8(args) -> dict[str, dict]:
    """The shipped 5-bit INQ recipe then post-training int8, in each checkout (INQ trains once, in the first)."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "inq-then-int8.yaml"
        recipe.write_text(INQ_THEN_PTQ)
        return {name: run_in(path, str(recipe), args.set) for name, path in (("FX", args.against), ("PT2E", HERE))}


if __name__ == "__main__":
    main()
