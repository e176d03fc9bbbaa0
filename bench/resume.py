"""Issue #23 benchmark: a baseline killed during epoch 6 of 8, resumed, against one that ran uninterrupted.

Runs `python -m pipeline run baseline` (the shipped baseline: resnet10t, 8 epochs, CIFAR-10) three times in fresh
private caches:

1. uninterrupted: its wall time and its training seconds;
2. killed: SIGTERM half-way through epoch 6 (half an epoch after the log says epoch 5 ended), like Ctrl-C or `kill`;
3. the same command again, which resumes the stage from its last checkpoint: its wall time.

and prints the restart's share of the uninterrupted run (wall time, and training seconds as the stage records them),
and whether the resumed model ends with the uninterrupted run's metrics (validation and test top-1, the loss of every
epoch, every weight).

    .venv/bin/python bench/resume.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import load_artifact  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"train: epoch (\d+)/(\d+), .*, ([\d.]+)s, ETA")


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, PIPELINE_CACHE_DIR=str(cache), MLFLOW_TRACKING_URI=f"sqlite:///{cache}/mlflow.db")


def _command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "baseline", "deploy.runtimes=[]", *overrides]


def run_to_end(cache: Path, overrides: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(_command(overrides), cwd=PROJECT_ROOT, env=_env(cache), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return time.perf_counter() - start, done.stderr


def run_and_kill(cache: Path, overrides: list[str], after_epoch: int) -> float:
    """Start a run, SIGTERM it half an epoch after epoch `after_epoch` ends; returns the seconds it ran."""
    start = time.perf_counter()
    proc = subprocess.Popen(_command(overrides), cwd=PROJECT_ROOT, env=_env(cache), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = EPOCH_LINE.search(line)
        if match and int(match.group(1)) == after_epoch:
            time.sleep(float(match.group(3)) / 2)
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=600)
    if proc.returncode != 130:
        raise RuntimeError(f"the run was not interrupted as planned (exit {proc.returncode})")
    return time.perf_counter() - start


def outcome(cache: Path) -> dict:
    (record_path,) = cache.glob("stages/*/*/record.json")
    record = json.loads(record_path.read_text())
    (metrics_path,) = record_path.parent.glob("metrics/*.json")
    metrics = json.loads(metrics_path.read_text())
    return {"record": record, "metrics": metrics, "model": load_artifact(record_path.parent / "artifact.pt")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value")
    parser.add_argument("--kill-in-epoch", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        full_cache, resumed_cache = Path(tmp) / "full", Path(tmp) / "resumed"
        full_seconds, _ = run_to_end(full_cache, args.set)
        killed_seconds = run_and_kill(resumed_cache, args.set, args.kill_in_epoch - 1)
        restart_seconds, log = run_to_end(resumed_cache, args.set)
        full, resumed = outcome(full_cache), outcome(resumed_cache)
    pairs = zip(full["model"].state_dict().values(), resumed["model"].state_dict().values(), strict=True)
    same_weights = all(torch.equal(a, b) for a, b in pairs)
    losses = [[e["train_loss"] for e in o["record"]["train_history"]] for o in (full, resumed)]
    resumed_at = [line for line in log.splitlines() if "resuming" in line]
    print(f"uninterrupted: {full_seconds:.1f} s wall, training {full['record']['seconds']:.1f} s "
          f"[{'; '.join(full['record']['numerics'])}]")  # fmt: skip
    print(f"killed run: {killed_seconds:.1f} s wall until SIGTERM in epoch {args.kill_in_epoch}")
    print(
        f"restart: {restart_seconds:.1f} s wall ({restart_seconds / full_seconds:.3f} of the uninterrupted run; "
        f"goal <= {3 / 8:.3f}), training {resumed['record']['seconds']:.1f} s "
        f"({resumed['record']['seconds'] / full['record']['seconds']:.3f}); {'; '.join(resumed_at) or 'no resume'}"
    )
    for key in ("val_top1", "top1", "top5"):
        print(f"{key}: uninterrupted {full['metrics'][key]:.2f}, resumed {resumed['metrics'][key]:.2f}")
    print(f"every epoch's loss equal: {losses[0] == losses[1]}; every weight equal: {same_weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
