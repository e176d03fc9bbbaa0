"""Issue #23: every stage trained on a CUDA GPU, with the speed it reaches.

Two checks, on synthetic images held on the device (a GPU machine has no datasets; the class is written into each
image's brightness so the models learn something):

1. Every registered stage on a small model at 32 px (the default recipe's resnet10t) and on resnet50 at 224 px, batch
   128, `precision: auto` (AMP): each stage's images/s over its last epoch and what it trained in.
2. The default chain (recipes/prune-inq-distill.yaml's baseline and stages, their epochs) at 32 px on the GPU and on
   this machine's CPU, on the same images: the ratio of their training seconds.

    python bench/gpu_check.py                      # on a GPU machine (the device tool's: see BENCHMARKS.md)
    python bench/gpu_check.py --device cpu --quick # the same code on a CPU, small, to check the script itself

Prints a table per check and writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.data import DataBundle, DataConfig, Preprocessing, Split  # noqa: E402
from pipeline.core.models import ModelConfig  # noqa: E402
from pipeline.recipe.loading import read_raw, resolve_recipe_path  # noqa: E402
from stages import StageContext, available_stages, get_stage  # noqa: E402


class DeviceBatches:
    """Batches cut from uint8 images already on the device, normalised there: the GPU never waits for the host."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int):
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = torch.tensor(1 / (0.25 * 255), device=images.device)

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield (self.images[idx].float() - 127.5) * self.scale, self.labels[idx]


class DeviceBundle(DataBundle):
    """A DataBundle whose loaders are `DeviceBatches`."""

    def train_loader(self, batch_size: int, *, seed: int, augment: bool, device="cpu"):
        return DeviceBatches(self.train.images, self.train.labels, batch_size, shuffle=True, seed=seed)

    def eval_loader(self, split: str, batch_size: int | None = None):
        data = self.val if split == "val" else self.test
        return DeviceBatches(data.images, data.labels, batch_size or 256, shuffle=False, seed=0)


def synthetic(n: int, side: int, classes: int, device: torch.device, seed: int = 0) -> DeviceBundle:
    gen = torch.Generator().manual_seed(seed)

    def split(count: int) -> Split:
        labels = torch.arange(count) % classes
        base = (labels.float() * (200 / (classes - 1)) + 20).view(-1, 1, 1, 1)
        noise = torch.randint(-40, 41, (count, 3, side, side), generator=gen).float()
        return Split((base + noise).clamp(0, 255).to(torch.uint8).to(device), labels.to(device))

    pre = Preprocessing((3, side, side), (0.5,) * 3, (0.25,) * 3, origin="synthetic")
    return DeviceBundle(split(n), split(max(n // 8, 64)), split(max(n // 8, 64)), [f"c{i}" for i in range(classes)],
                        pre)  # fmt: skip


def context(bundle: DeviceBundle, model: str, batch: int, device: torch.device, baseline=None) -> StageContext:
    return StageContext(data=bundle, data_config=DataConfig(batch_size=batch, augment=False),
                        model_config=ModelConfig(name=model), device=device, seed=0,
                        baseline=lambda: copy.deepcopy(baseline), progress=False)  # fmt: skip


def last_epoch_rate(report, images_per_epoch: int) -> float:
    return images_per_epoch / report.history[-1]["epoch_seconds"]


def stage_speeds(model: str, side: int, batch: int, images: int, device: torch.device) -> list[dict]:
    """Each stage run on `model` for 2 epochs per fit call (the first warms up: cuDNN autotuning, allocator)."""
    bundle = synthetic(images, side, 10, device)
    torch.manual_seed(0)
    start = time.perf_counter()
    train = get_stage("train").run(None, get_stage("train").config(epochs=2, lr=0.1), context(bundle, model, batch,
                                                                                                 device))  # fmt: skip
    rows = [_row("train", train, time.perf_counter() - start, images, batch)]
    base = train.state
    settings = {"inq": {"accumulated_portions": [0.5, 1.0]}, "qat": {"freeze_observers_epoch": 2,
                                                                      "freeze_bn_epoch": 2}}  # fmt: skip
    for name in [n for n in available_stages() if n != "train"]:
        config = get_stage(name).config.model_validate({"epochs": 2, **settings.get(name, {})})
        start = time.perf_counter()
        out = get_stage(name).run(copy.deepcopy(base), config, context(bundle, model, batch, device, base))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(_row(name, out, time.perf_counter() - start, images, batch))
    return rows


def _row(name: str, out, seconds: float, images: int, batch: int) -> dict:
    per_epoch = (images // batch) * batch
    return {
        "stage": name,
        "images_per_s": round(last_epoch_rate(out.report, per_epoch), 1),
        "stage_seconds": round(seconds, 2),
        "epochs": out.report.epochs,
        "numerics": "; ".join(out.report.numerics),
    }


def default_chain_seconds(images: int, device: torch.device) -> dict:
    """The default recipe's baseline and stages (their epochs and settings) at 32 px on `device`: training seconds."""
    # The recipe merged with the recipes it extends, read without validation: a GPU box may have neither the dataset
    # nor the deploy runtimes, and only training is timed here.
    recipe = read_raw(resolve_recipe_path("prune-inq-distill"))
    bundle = synthetic(images, 32, 10, device)
    ctx = context(bundle, recipe["model"]["name"], recipe["data"]["batch_size"], device)
    torch.manual_seed(0)
    seconds = {}
    start = time.perf_counter()
    state = get_stage("train").run(None, get_stage("train").config(**recipe["baseline"]), ctx).state
    seconds["train"] = time.perf_counter() - start
    base = copy.deepcopy(state)
    ctx.baseline = lambda: copy.deepcopy(base)  # as the runner does: a fresh copy from the cache each time
    for entry in recipe["stages"]:
        ((name, settings),) = entry.items()
        start = time.perf_counter()
        state = get_stage(name).run(state, get_stage(name).config(**settings), ctx).state
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    return {k: round(v, 2) for k, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--skip-cpu-chain", action="store_true", help="only the GPU side of the chain check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    torch.set_num_threads(torch.get_num_threads())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({gpu}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    sizes = {"small": ("resnet10t", 32, 128, 512 if args.quick else 8192),
             "224px": ("test_resnet" if args.quick else "resnet50", 64 if args.quick else 224, 16 if args.quick
                       else 128, 64 if args.quick else 1024)}  # fmt: skip
    results: dict = {"device": str(device), "gpu": gpu, "torch": torch.__version__, "stages": {}}
    for label, (model, side, batch, images) in sizes.items():
        rows = stage_speeds(model, side, batch, images, device)
        results["stages"][label] = {"model": model, "side": side, "batch": batch, "images": images, "rows": rows}
        print(f"\n{model} at {side} px, batch {batch}, {images} images: images/s over each stage's last epoch")
        print(f"{'stage':<9} {'images/s':>9} {'seconds':>8}  numerics")
        for r in rows:
            print(f"{r['stage']:<9} {r['images_per_s']:>9.1f} {r['stage_seconds']:>8.2f}  {r['numerics']}")
    chain_images = 512 if args.quick else 5000
    results["chain"] = {"images": chain_images, device.type: default_chain_seconds(chain_images, device)}
    if device.type == "cuda" and not args.skip_cpu_chain:
        results["chain"]["cpu"] = default_chain_seconds(chain_images, torch.device("cpu"))
    print(f"\ndefault chain (prune-inq-distill's epochs) at 32 px on {chain_images} images, training seconds:")
    for where, seconds in results["chain"].items():
        if where != "images":
            print(f"  {where}: {seconds} (total {sum(seconds.values()):.1f} s)")
    if "cpu" in results["chain"] and "cuda" in results["chain"]:
        ratio = sum(results["chain"]["cpu"].values()) / sum(results["chain"]["cuda"].values())
        results["chain"]["gpu_speedup"] = round(ratio, 2)
        print(f"  the GPU trains the chain {ratio:.1f}x as fast as this machine's CPU")
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
