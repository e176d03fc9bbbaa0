"""Issue #23 benchmark: the default baseline trained with `precision: auto` against plain fp32 (today's NCHW fp32).

For each seed, the shipped baseline (recipes/baseline.yaml: resnet10t, 8 epochs on CIFAR-10's 45,000 training
images, batch 128) is trained once with `precision: fp32, channels_last: false` and once with `precision: auto`,
interleaved (fp32 s0, auto s0, fp32 s1, ...), each in its own `python -m pipeline run` process with a shared, private
cache and MLflow store. Printed: what auto picked, the median epoch time of each and the ratio per seed (epochs as the
loop times them: data loading, evaluation and start-up left out), the whole training's seconds, and top-1 on the
validation and test splits with mean and 95 % interval over seeds, and the paired difference auto - fp32 on the test
split (seeds and images resampled together) with an exact McNemar test pooled over seeds.

    .venv/bin/python bench/precision.py [--seeds 0 1 2] [--epochs 8] [--compile-seeds 0] [--set key=value ...]

With --compile-seeds, those seeds also train `auto` with `compile: true`: the first epoch (compilation included),
the later ones, and the whole training against eager `auto`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.significance import is_correct, mcnemar_exact, mean_ci, paired_bootstrap_diff  # noqa: E402
from pipeline.core.metrics import load_predictions  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.run.cache import StageCache  # noqa: E402
from pipeline.run.keys import evaluation_key, plan_chain  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": ["baseline.precision=fp32", "baseline.channels_last=false"], "auto": []}
COMPILED = {"auto+compile": ["baseline.compile=true"]}  # timing only, for --compile-seeds
COMMON = ["deploy.runtimes=[]"]  # torch accuracy only: the runtimes are not what is compared here


def run(seed: int, variant: str, args, cache: Path) -> dict:
    """Train one baseline in its own process; returns its record and metrics, read back from the cache."""
    overrides = [f"seed={seed}", f"baseline.epochs={args.epochs}", *COMMON, *{**VARIANTS, **COMPILED}[variant],
                 *args.set]  # fmt: skip
    env = dict(os.environ, PIPELINE_CACHE_DIR=str(cache), MLFLOW_TRACKING_URI=f"sqlite:///{cache}/mlflow.db")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "baseline", *overrides], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=6 * 3600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed} {variant} failed:\n{done.stderr[-3000:]}")
    recipe = load_recipe("baseline", overrides)
    entry = StageCache(cache / "stages").get(plan_chain(recipe)[0].key)
    metrics = entry.metrics(evaluation_key(recipe))
    predictions = load_predictions(entry.predictions_path(evaluation_key(recipe)), "test")
    return {
        "seed": seed,
        "variant": variant,
        "numerics": entry.record["numerics"],
        "epoch_seconds": [e["epoch_seconds"] for e in entry.record["train_history"]],
        "stage_seconds": entry.record["seconds"],
        "process_seconds": time.perf_counter() - start,
        "val_top1": metrics["val_top1"],
        "top1": metrics["top1"],
        "correct": is_correct(predictions["torch"], predictions["labels"]),
    }


def summarize(results: list[dict], seeds: list[int]) -> dict:
    by = {(r["variant"], r["seed"]): r for r in results}
    ratios = [statistics.median(by["fp32", s]["epoch_seconds"]) / statistics.median(by["auto", s]["epoch_seconds"])
              for s in seeds]  # fmt: skip
    correct = {v: np.stack([by[v, s]["correct"] for s in seeds]) for v in VARIANTS}
    out = {
        "numerics": {v: by[v, seeds[0]]["numerics"] for v in VARIANTS},
        "median_epoch_seconds": {
            v: statistics.median(x for s in seeds for x in by[v, s]["epoch_seconds"]) for v in VARIANTS
        },  # fmt: skip
        "epoch_ratio_per_seed": [round(r, 3) for r in ratios],
        "epoch_ratio_median": round(statistics.median(ratios), 3),
        "stage_seconds": {v: [round(by[v, s]["stage_seconds"], 1) for s in seeds] for v in VARIANTS},
        "top1": {},
        "paired_auto_minus_fp32": None,
    }
    for v in VARIANTS:
        for split in ("val_top1", "top1"):
            ci = mean_ci([by[v, s][split] for s in seeds])
            out["top1"][f"{v} {split}"] = {"per_seed": [by[v, s][split] for s in seeds], "mean": round(ci.mean, 2),
                                           "ci95": [round(ci.low, 2), round(ci.high, 2)]}  # fmt: skip
    for s in seeds:
        if ("auto+compile", s) in by:
            compiled, eager = by["auto+compile", s], by["auto", s]
            out.setdefault("compile", []).append({
                "seed": s,
                "first_epoch_seconds": round(compiled["epoch_seconds"][0], 1),
                "later_epochs_median": round(statistics.median(compiled["epoch_seconds"][1:]), 2),
                "eager_epochs_median": round(statistics.median(eager["epoch_seconds"]), 2),
                "stage_seconds_compiled_vs_eager": [round(compiled["stage_seconds"], 1),
                                                    round(eager["stage_seconds"], 1)],
            })  # fmt: skip
    diff = paired_bootstrap_diff(correct["auto"], correct["fp32"], rng=0)
    test = mcnemar_exact(correct["auto"], correct["fp32"])
    out["paired_auto_minus_fp32"] = {"points": round(diff.mean, 3), "ci95": [round(diff.low, 3), round(diff.high, 3)],
                                     "mcnemar_p": round(test.p_value, 4), "only_auto_right": test.b,
                                     "only_fp32_right": test.c}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--compile-seeds", type=int, nargs="*", default=[], help="also train auto+compile for these")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for both variants")
    parser.add_argument("--cache", type=Path, default=PROJECT_ROOT / ".cache" / "bench" / "precision")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for variant in [*VARIANTS, *(COMPILED if seed in args.compile_seeds else [])]:
            results.append(run(seed, variant, args, args.cache))
            r = results[-1]
            print(f"seed {seed} {variant:>4}: median epoch {statistics.median(r['epoch_seconds']):.1f} s, training "
                  f"{r['stage_seconds']:.0f} s, val {r['val_top1']:.2f} %, test {r['top1']:.2f} % "
                  f"[{'; '.join(r['numerics'])}]", flush=True)  # fmt: skip
    summary = summarize(results, args.seeds)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
