"""Issue #22 benchmark: does the streaming loader keep the training step fed at 224 px?

timm resnet10t from a local checkpoint (its own preprocessing, at 224 px), batch 64, SGD steps on the CPU with every
core. Side by side in one process, interleaved A B A B: the step on one fixed synthetic batch (no data work at all)
and the step on the streaming loader's batches (decode, RandomResizedCrop, flip, colour jitter in `workers` worker
processes, normalisation in this one), for each worker count. Reports the median step time of each and the ratio
real / synthetic (goal: <= 1.15).

    .venv/bin/python bench/make_photos.py --train 22223 --test 500
    .venv/bin/python bench/data_stream.py --workers 1 2 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.core.data import DataConfig, load_data  # noqa: E402
from pipeline.core.models import ModelConfig, create_model  # noqa: E402
from pipeline.core.training import (  # noqa: E402
    TrainConfig,  # noqa: E402
    build_optimizer,
    cross_entropy_loss,
)


def step_times(model, optimizer, batches, steps: int) -> list[float]:
    """Seconds of each of `steps` SGD steps, the wait for the batch included."""
    loss_fn = cross_entropy_loss(0.0)
    model.train()
    times, it = [], iter(batches)
    for _ in range(steps):
        start = time.perf_counter()
        images, labels = next(it)
        loss, _ = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=PROJECT_ROOT / ".cache" / "bench" / "cifar10-256px-22223")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224, help="input side (data.img_size; resnet10t's own is 176)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    import timm

    torch.set_num_threads(torch.get_num_threads())
    checkpoint = PROJECT_ROOT / ".cache" / "bench" / f"{args.model}-imagenet-head.pt"
    if not checkpoint.is_file():
        torch.save(timm.create_model(args.model, num_classes=1000).state_dict(), checkpoint)
    model_cfg = ModelConfig(name=args.model, checkpoint=checkpoint)
    data = dict(dataset="imagefolder", root=args.folder, loader="stream", img_size=args.img_size)
    bundles = {w: load_data(DataConfig(**data, workers=w), model_cfg) for w in args.workers}
    some = next(iter(bundles.values()))
    model, _ = create_model(model_cfg, some.num_classes)
    optimizer = build_optimizer(model, TrainConfig(lr=0.01))
    synthetic = torch.randn(args.batch_size, *some.input_size), torch.randint(0, some.num_classes, (args.batch_size,))

    def forever(batch):
        while True:
            yield batch

    samples: dict[str, list[float]] = {"synthetic": [], **{f"stream, {w} worker(s)": [] for w in args.workers}}
    loaders = {w: b.train_loader(args.batch_size, seed=0, augment=True) for w, b in bundles.items()}
    iters = {w: iter(loader) for w, loader in loaders.items()}  # workers stay up across measurements
    for r in range(args.rounds):
        step_times(model, optimizer, forever(synthetic), 3)
        samples["synthetic"].append(statistics.median(step_times(model, optimizer, forever(synthetic), args.steps)))
        for w in args.workers:
            step_times(model, optimizer, iters[w], 3)  # warm: the workers' queue is full again
            median = statistics.median(step_times(model, optimizer, iters[w], args.steps))
            samples[f"stream, {w} worker(s)"].append(median)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in samples.items()), flush=True)
    base = statistics.median(samples["synthetic"])
    print(f"\n{args.model}, batch {args.batch_size}, {some.input_size[1]} px, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} rounds x {args.steps} steps (median step):")  # fmt: skip
    for name, values in samples.items():
        step = statistics.median(values)
        print(f"  {name:<22} {step * 1e3:7.0f} ms/step  {args.batch_size / step:6.1f} img/s  {step / base:.3f}x")


if __name__ == "__main__":
    main()
