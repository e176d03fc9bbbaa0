"""Issue #4 analysis: what INQ's level set alone does to the trained baseline, before any retraining.

Every conv/linear weight of the cached fp32 baseline is rounded to its layer's power-of-two levels at
once (no portions, no retraining), with the paper's n1 (`max`) and with the least-squares fit (`mse`):
the share of weights that round to zero, how far the fit moves n1, and the test top-1 that is left.

    .venv/bin/python bench/inq_levels.py              (or: make bench-inq-levels)
"""

from __future__ import annotations

import copy
import statistics

import torch
from common import Runner, load_artifact, load_recipe, machine, parse_args

from pipeline.core.metrics import accuracy
from stages.inq import fit_exponents, inq_parameters, quantize_pow2


@torch.no_grad()
def round_all_(model: torch.nn.Module, bits: int, rule: str) -> tuple[float, list[int]]:
    """Round every INQ weight in place; returns (share of them at zero, octaves the rule moved each layer's n1)."""
    zeros = total = 0
    shifts = []
    for param in inq_parameters(model).values():
        w = param.detach()
        if not w.any():  # an all-zero layer has no level set and stays zero
            continue
        nonzero = w[w != 0]
        n1, n2 = fit_exponents(nonzero, bits, rule)
        shifts.append(fit_exponents(nonzero, bits, "max")[0] - n1)
        param.copy_(quantize_pow2(w, n1, n2))
        zeros += int((param == 0).sum())
        total += param.numel()
    return zeros / total, shifts


def main() -> None:
    args = parse_args(__doc__)
    runner = Runner(load_recipe("baseline", args.set))
    baseline = load_artifact(runner.run().results[0].artifact_path)
    loader = runner.data.test_loader(500)
    print(f"\nbench/inq_levels.py {' '.join(args.set)}".rstrip() + f"\nmachine: {machine()}\n")
    print(f"fp32 baseline: top1 {accuracy(baseline, loader)[0]:.2f} %")
    weights = [p.detach() for p in inq_parameters(baseline).values()]
    tails = sorted(float(w.abs().max() / w.std()) for w in weights if w.any())
    print(
        f"largest |w| per layer, in standard deviations of that layer ({len(tails)} layers): "
        f"min {tails[0]:.1f}, median {statistics.median(tails):.1f}, max {tails[-1]:.1f}\n"
    )
    print("| bits | n1 rule | n1 below the paper's (octaves, min-median-max) | weights at 0 | top1 % (no retraining) |")
    print("| ---: | --- | --- | ---: | ---: |")
    for bits in (5, 4, 3, 2):
        for rule in ("max", "mse"):
            model = copy.deepcopy(baseline)
            zero_share, shifts = round_all_(model, bits, rule)
            spread = f"{min(shifts)}-{statistics.median(shifts):g}-{max(shifts)}"
            print(f"| {bits} | {rule} | {spread} | {100 * zero_share:.1f} % | {accuracy(model, loader)[0]:.2f} |")


if __name__ == "__main__":
    main()
