"""Issue #22 benchmark: peak memory of a one-epoch run on a 224-px photo folder, as the training set grows.

Each size runs `python -m pipeline run` in a fresh process (fresh cache and MLflow store): timm lcnet_050 from a local
checkpoint (so the model's own preprocessing: 224 px, bicubic, ImageNet statistics), one baseline epoch with
`data.loader: stream`, evaluated on validation and test. While it runs, the memory of its whole process tree (the run
and its DataLoader workers) is sampled from /proc every 0.2 s: peak RSS of the main process (what `/usr/bin/time -v`
reports), and peak PSS summed over the tree (shared pages counted once: what the machine actually gives it).

    .venv/bin/python bench/make_photos.py --train 22223 --test 500
    .venv/bin/python bench/data_memory.py --sizes 2000 20000 [--legacy-tree ../baseline --legacy-sizes 2000]

`--legacy-tree` runs the same job with the code of another checkout (e.g. the commit before streaming, as a git
worktree), whose data path decodes every image into memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))


def _tree(pid: int) -> list[int]:
    """`pid` and every descendant."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run `command`; peak main-process RSS, peak tree PSS and peak tree RSS (MB), and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"main_rss_mb": 0.0, "tree_pss_mb": 0.0, "tree_rss_mb": 0.0}
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak["main_rss_mb"] = max(peak["main_rss_mb"], _kb(proc.pid, "Rss") / 1024)
        peak["tree_pss_mb"] = max(peak["tree_pss_mb"], sum(_kb(p, "Pss") for p in pids) / 1024)
        peak["tree_rss_mb"] = max(peak["tree_rss_mb"], sum(_kb(p, "Rss") for p in pids) / 1024)
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {**peak, "seconds": time.perf_counter() - start, "log": err}


def recipe(folder: Path, checkpoint: Path, train: int, legacy: bool, extra: dict) -> dict:
    data = {"dataset": "imagefolder", "root": str(folder), "batch_size": 64, "train_subset": train, **extra}
    if legacy:  # the code before streaming: no loader choice; it needs an explicit side for 256-px images
        data["img_size"] = 224
    else:
        data["loader"] = "stream"
    return {
        "name": "bench-data-memory",
        "data": data,
        "model": {"name": "lcnet_050", "checkpoint": str(checkpoint)},
        "baseline": {"epochs": 1, "lr": 0.01},
        "stages": [],
        "evaluation": {"latency_runs": 5, "warmup_runs": 2, "throughput_runs": 2, "throughput_batch_size": 8},
        "deploy": {"runtimes": []},
    }


def run(tree: Path, folder: Path, checkpoint: Path, train: int, legacy: bool, extra: dict) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(folder, checkpoint, train, legacy, extra)))
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PIPELINE_CACHE_DIR=f"{tmp}/cache")
        return measure([sys.executable, "-m", "pipeline", "run", str(path), "--quiet"], env, tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=PROJECT_ROOT / ".cache" / "bench" / "cifar10-256px-22223")
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--legacy-tree", type=Path, default=None, help="another checkout to measure too")
    parser.add_argument("--legacy-sizes", type=int, nargs="*", default=[2000])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each size, interleaved; medians reported")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more data: settings")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not (args.folder / "train").is_dir():
        sys.exit(f"no photo folder at {args.folder}: run bench/make_photos.py first")
    import timm
    import torch

    # A local checkpoint as a user has one (random weights here): an ImageNet head, which the pipeline replaces;
    # the code before could not, so the legacy run gets one fitted to CIFAR-10's 10 classes.
    checkpoints = {}
    for legacy, classes in ((False, 1000), (True, 10)):
        checkpoints[legacy] = PROJECT_ROOT / ".cache" / "bench" / f"lcnet_050-{classes}-classes.pt"
        if not checkpoints[legacy].is_file():
            torch.save(timm.create_model("lcnet_050", num_classes=classes).state_dict(), checkpoints[legacy])
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    jobs = [("stream", PROJECT_ROOT, n, False) for _ in range(args.repeats) for n in args.sizes]
    jobs += [("legacy", args.legacy_tree.resolve(), n, True) for n in args.legacy_sizes] if args.legacy_tree else []
    rows = []
    for label, tree, n, legacy in jobs:
        result = run(tree, args.folder.resolve(), checkpoints[legacy], n, legacy, extra)
        rows.append({"code": label, "train_images": n, **{k: v for k, v in result.items() if k != "log"}})
        print(f"{label:>7} {n:>6} train images: main RSS {result['main_rss_mb']:8.0f} MB, tree PSS "
              f"{result['tree_pss_mb']:8.0f} MB, tree RSS {result['tree_rss_mb']:8.0f} MB, {result['seconds']:.0f} s",
              flush=True)  # fmt: skip
    medians = {n: {k: statistics.median(r[k] for r in rows if r["code"] == "stream" and r["train_images"] == n)
                   for k in ("main_rss_mb", "tree_pss_mb")} for n in args.sizes}  # fmt: skip
    for n, m in medians.items():
        print(f"median of {args.repeats}, {n} training images: main RSS {m['main_rss_mb']:.0f} MB, "
              f"tree PSS {m['tree_pss_mb']:.0f} MB")  # fmt: skip
    if len(args.sizes) >= 2:
        a, b = medians[args.sizes[0]], medians[args.sizes[-1]]
        print(
            f"growth from {args.sizes[0]} to {args.sizes[-1]} training images (medians): main RSS "
            f"{b['main_rss_mb'] - a['main_rss_mb']:+.0f} MB, tree PSS {b['tree_pss_mb'] - a['tree_pss_mb']:+.0f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
