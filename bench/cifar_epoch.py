"""Issue #22 benchmark: the CIFAR-10 epoch at 32 px with the default data settings, against another checkout.

Runs one baseline epoch (timm resnet10t, batch 128, the recipes' shared baseline settings) through
`python -m pipeline run baseline` in each variant, interleaved A B C A B C ..., and reads the epoch's own time from
the run's log line (`train: epoch 1/1, ..., 41.2s`), so start-up, decoding and evaluation are left out. Variants:
this checkout with its defaults (`data.loader: auto`, 10 % of train/ held out for validation: 45,000 images), this
checkout on all 50,000 (`data.val_split=0`: the same work as before validation splits), and `--against` (another
checkout, e.g. the commit before streaming as a git worktree: `git worktree add ../before <commit>`).

    .venv/bin/python bench/cifar_epoch.py --against ../before --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"train: epoch 1/1, loss [\d.]+, train top-1 [\d.]+%, ([\d.]+)s")
COMMON = ["baseline.epochs=1", "deploy.runtimes=[]", "evaluation.latency_runs=5", "evaluation.throughput_runs=2"]


def epoch_seconds(tree: Path, overrides: list[str], cache: Path) -> float:
    """The epoch's seconds as the run logs them (stderr not a terminal: one line per epoch)."""
    env = dict(os.environ, PIPELINE_CACHE_DIR=str(cache), MLFLOW_TRACKING_URI=f"sqlite:///{cache}/mlflow.db")
    command = [sys.executable, "-m", "pipeline", "run", "baseline", *COMMON, *overrides, "--no-cache"]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    match = EPOCH.search(done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{tree}: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, default=None, help="another checkout to time beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = {
        "this checkout, defaults (45,000 images)": (PROJECT_ROOT, [], 45_000),
        "this checkout, val_split=0 (50,000)": (PROJECT_ROOT, ["data.val_split=0"], 50_000),
    }
    if args.against:
        variants[f"{args.against} (50,000)"] = (args.against.resolve(), [], 50_000)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        caches = {tree: Path(tmp) / f"cache{i}" for i, tree in enumerate({t for t, _, _ in variants.values()})}
        for tree, overrides, _ in variants.values():  # warm-up: fills each tree's decode cache
            epoch_seconds(tree, overrides, caches[tree])
        for r in range(args.rounds):
            for name, (tree, overrides, _) in variants.items():
                times[name].append(epoch_seconds(tree, overrides, caches[tree]))
            print(f"round {r + 1}: " + ", ".join(f"{n}: {t[-1]:.1f} s" for n, t in times.items()), flush=True)
    rates = {name: variants[name][2] / statistics.median(t) for name, t in times.items()}
    reference = rates[next(reversed(rates))] if args.against else None
    print(f"\nmedian of {args.rounds} interleaved rounds (epoch seconds from the run's own log line):")
    for name, t in times.items():
        ratio = f", {rates[name] / reference:.3f}x the last" if reference else ""
        print(f"  {name:<48} {statistics.median(t):6.1f} s  {rates[name]:7.0f} img/s{ratio}")


if __name__ == "__main__":
    main()
