"""Issue #23: the CPU bf16 convolution bug that `precision: auto` steers around (pipeline/core/precision.py).

torch 2.14's CPU kernels leave part of the bf16 weight gradient of a padded convolution unwritten when the
convolution's input is smaller than its stride in a spatial dimension; the unwritten entries hold whatever the memory
held before, NaN at times. This script poisons freed memory with NaN, runs the bf16 backward of one convolution per
geometry, and prints which geometries came back with non-finite gradients, next to what `cpu_autocast_hazards`
predicts for them. fp32 is run as the control.

    .venv/bin/python bench/bf16_conv_bug.py [--trials 6]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.precision import cpu_autocast_hazards  # noqa: E402


def poisoned_backward(side: int, kernel: int, stride: int, padding: int, bf16: bool, trials: int) -> bool:
    """Whether any of `trials` backward passes gave a non-finite gradient."""
    for _ in range(trials):
        for size in (1 << 10, 1 << 14, 1 << 18, 1 << 20):
            for dtype in (torch.float32, torch.bfloat16):
                poison = torch.full((size,), float("nan"), dtype=dtype)
                del poison
        conv = torch.nn.Conv2d(32, 32, kernel, stride, padding, bias=False)
        x = torch.randn(8, 32, side, side, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.float().sum().backward()
        if not (torch.isfinite(conv.weight.grad).all() and torch.isfinite(x.grad).all()):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"AVX512_BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}")  # fmt: skip
    print(f"{'input':>5} {'kernel':>6} {'stride':>6} {'pad':>3}  bf16  fp32  predicted")
    wrong = 0
    for side, kernel, stride in itertools.product([1, 2, 3, 4], [1, 3, 5], [1, 2, 3, 4]):
        for padding in sorted({0, kernel // 2}):
            if side + 2 * padding < kernel:
                continue
            bad16 = poisoned_backward(side, kernel, stride, padding, True, args.trials)
            bad32 = poisoned_backward(side, kernel, stride, padding, False, args.trials)
            probe = torch.nn.Sequential(torch.nn.Conv2d(32, 32, kernel, stride, padding))
            predicted = bool(cpu_autocast_hazards(probe, (32, side, side)))
            wrong += bad16 != predicted
            if bad16 or bad32 or predicted:
                print(f"{side:>5} {kernel:>6} {stride:>6} {padding:>3}  {'NaN' if bad16 else 'ok':>4}  "
                      f"{'NaN' if bad32 else 'ok':>4}  {'hazard' if predicted else '-'}")  # fmt: skip
    print(f"geometries where the prediction and bf16 disagree: {wrong} (others all finite in bf16 and fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
