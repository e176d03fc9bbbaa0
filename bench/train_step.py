"""Issue #23 benchmark: one training step in each precision and memory format, side by side in one process.

An SGD step (forward, cross-entropy, backward, step) of a timm model on a fixed batch, for fp32 / bf16 autocast, NCHW /
channels_last, and optionally torch.compile; variants interleaved round by round, median step time per variant, so
the ratios are measured under the same machine load. This is what `precision: auto` and `channels_last: auto` rest on.

    .venv/bin/python bench/train_step.py [--model resnet10t] [--batch 128] [--side 32] [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.precision import resolve_numerics  # noqa: E402

VARIANTS = {"fp32": ("fp32", False), "fp32 + channels_last": ("fp32", True), "bf16": ("bf16", False),
            "bf16 + channels_last": ("bf16", True)}  # fmt: skip


class Step:
    """One variant's model, optimizer and batch."""

    def __init__(self, model: str, batch: int, side: int, precision: str, channels_last: bool, compile_: bool):
        torch.manual_seed(0)
        self.numerics = resolve_numerics(precision, channels_last, torch.device("cpu"))
        self.model = timm.create_model(model, num_classes=10).to(memory_format=self.numerics.memory_format)
        self.forward = torch.compile(self.model) if compile_ else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, side, side).contiguous(memory_format=self.numerics.memory_format)
        self.y = torch.randint(0, 10, (batch,))

    def __call__(self) -> None:
        with self.numerics.autocast(torch.device("cpu")):
            logits = self.forward(self.x)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also the compiled fp32 and bf16 + channels_last")
    args = parser.parse_args(argv)
    variants = {name: (*v, False) for name, v in VARIANTS.items()}
    if args.compile:
        variants |= {"fp32, compiled": ("fp32", False, True), "bf16 + channels_last, compiled": ("bf16", True, True)}
    steps = {name: Step(args.model, args.batch, args.side, *v) for name, v in variants.items()}
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["fp32"])
    print(f"{args.model}, batch {args.batch}, {args.side} px, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}; median of {args.rounds} rounds "
          f"of {args.steps} steps")  # fmt: skip
    print(f"{'variant':<32} {'images/s':>9} {'vs fp32':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<32} {args.batch / median:>9.0f} {base / median:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
