"""Issue #26: is the baseline converged? The criterion: the equal-training control (the same baseline trained
`--control-epochs` more epochs in fp32, with the optimizer and schedule the sweep's control uses) no longer beats
the baseline significantly on the validation split (paired bootstrap over seeds and images; test reported).

    .venv/bin/python bench/converged.py [--epochs 30] [--control-epochs 5] [--seeds 0 1 2]
        [--recipe sweep-prune-qat-distill]

The baseline is the recipe's (recipes/baseline.yaml unless its `baseline:` is overridden) with `baseline.epochs`
set to each of `--epochs`; it is trained once per length (seed 0); the control runs once per seed (the stages'
seed varies, as in a sweep with seed_scope: stages). Everything goes through the real runner, so the sweeps and
searches that later extend this baseline reuse it from the cache.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402

from pipeline.analysis.significance import mcnemar_exact, paired_bootstrap_diff  # noqa: E402
from pipeline.core.metrics import load_predictions  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.run.runner import Runner  # noqa: E402
from pipeline.run.stage_training import StageResult  # noqa: E402
from pipeline.sweep.sweep import control_chain  # noqa: E402


def correct(result: StageResult, split: str) -> np.ndarray:
    arrays = load_predictions(result.predictions_path, split)
    return arrays["torch"] == arrays["labels"]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[30], help="baseline lengths to try")
    parser.add_argument("--control-epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default="sweep-prune-qat-distill", help="whose baseline and control to use")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("\n| baseline epochs | baseline training | baseline val / test | control val / test (mean of seeds) | "
          "control − baseline, val [95 % CI] | McNemar p (val) | test diff | verdict |")  # fmt: skip
    print("| ---: | ---: | --- | --- | --- | ---: | ---: | --- |")
    for epochs in args.epochs:
        recipe = load_recipe(args.recipe, [f"baseline.epochs={epochs}", *args.set])
        first = recipe.stage_specs()[0]
        start = time.perf_counter()
        baseline = Runner(recipe.as_chain([]), progress=sys.stderr.isatty()).run().results[0]
        trained = baseline.metrics.get("stage_seconds", time.perf_counter() - start)
        controls = [
            Runner(control_chain(recipe, args.control_epochs, first, seed), progress=sys.stderr.isatty())
            .run()
            .results[-1]
            for seed in args.seeds
        ]
        cells = {}
        for split in ("val", "test"):
            ctrl = np.stack([correct(r, split) for r in controls])
            base = np.stack([correct(baseline, split)] * len(controls))
            cells[split] = (100 * base.mean(), 100 * ctrl.mean(), paired_bootstrap_diff(ctrl, base, rng=0),
                            mcnemar_exact(ctrl.ravel(), base.ravel()).p_value)  # fmt: skip
        b_val, c_val, diff, p = cells["val"]
        verdict = "control better (not converged)" if diff.low > 0 else "not significant (converged)"
        if diff.high < 0:
            verdict = "control worse"
        print(f"| {epochs} | {trained / 60:.1f} min | {b_val:.2f} / {cells['test'][0]:.2f} | {c_val:.2f} / "
              f"{cells['test'][1]:.2f} | {diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}] | {p:.3g} | "
              f"{cells['test'][2].mean:+.2f} | {verdict} |", flush=True)  # fmt: skip
        for seed, r in zip(args.seeds, controls, strict=True):
            print(f"|   control seed {seed} | {r.metrics.get('stage_seconds', 0) / 60:.1f} min | | "
                  f"{r.metrics['val_top1']:.2f} / {r.metrics['top1']:.2f} | | | | |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
