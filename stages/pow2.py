"""INQ's level set and rounding rule (Zhou et al. 2017, Eq. 2-4): a layer's power-of-two levels
{±2^n1, …, ±2^n2, 0} at b bits, the n1 rules (`max`, the paper's; `mse`, a least-squares fit), and the rounding of
weights onto them. Shared by the `inq` stage, its per-layer width allocation and the sensitivity probes."""

from __future__ import annotations

import math
from typing import Literal

import torch

N1Rule = Literal["max", "mse"]
N1_SEARCH = 8
"""How many top exponents the `mse` n1 rule tries, from the paper's n1 down."""


# --- the level set and the rounding rule ---------------------------------------------------


def inq_exponents(max_abs: float, bits: int) -> tuple[int, int]:
    """The exponents (n1, n2) of a layer's levels P = {±2^n1, …, ±2^n2, 0} (paper Eq. 2-3).

    `max_abs` is the layer's largest weight magnitude s; n1 = floor(log2(4s/3)) and
    n2 = n1 + 1 - 2^(b-1)/2, so there are 2^(b-2) magnitudes, each with both signs, plus zero.
    """
    if not (math.isfinite(max_abs) and max_abs > 0):
        raise ValueError(f"max_abs must be finite and > 0, got {max_abs}")
    if bits < 2:
        raise ValueError(f"bits must be >= 2, got {bits}")
    # frexp is exact: x = m·2^e with m in [0.5, 1), so floor(log2 x) = e - 1 without log rounding.
    n1 = math.frexp(4.0 * max_abs / 3.0)[1] - 1
    return n1, n1 + 1 - 2 ** (bits - 1) // 2


def fit_exponents(weights: torch.Tensor, bits: int, rule: N1Rule = "max") -> tuple[int, int]:
    """A layer's (n1, n2) for its (surviving, non-zero) `weights`, by `rule`.

    `max` is the paper's Eq. 2 (`inq_exponents` of the largest magnitude). `mse` tries that n1 and
    the `N1_SEARCH - 1` below it and keeps the one whose `quantize_pow2` rounding has the least
    squared error (ties: the larger n1); weights above the top level are clipped to ±2^n1.
    """
    w = weights.detach().flatten().double()
    n1, n2 = inq_exponents(float(w.abs().max()), bits)
    if rule == "max":
        return n1, n2
    if rule != "mse":
        raise ValueError(f"n1 rule must be 'max' or 'mse', got {rule!r}")
    errors = [(float(((quantize_pow2(w, n1 - d, n2 - d) - w) ** 2).sum()), d) for d in range(N1_SEARCH)]
    best = min(errors)[1]
    return n1 - best, n2 - best


def _lower_bounds(n1: int, n2: int) -> list[float]:
    """Smallest |w| that rounds to each magnitude 2^n2 … 2^n1 under Eq. 4: (α+β)/2 for adjacent α < β."""
    # α = 0 below 2^n2, so its bound is 2^(n2-1); above it (2^(k-1) + 2^k)/2 = 3·2^(k-2). All exact in fp64.
    return [2.0 ** (n2 - 1)] + [3.0 * 2.0 ** (k - 2) for k in range(n2 + 1, n1 + 1)]


def _magnitude_index(w: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Per entry: 0 for zero, j >= 1 for magnitude 2^(n2+j-1), by Eq. 4 (above 2^n1: 2^n1)."""
    bounds = torch.tensor(_lower_bounds(n1, n2), dtype=torch.float64, device=w.device)
    # fp64 holds every fp32/fp16/bf16 weight and every bound exactly, so the comparisons are exact.
    return torch.bucketize(w.detach().abs().double(), bounds, right=True)


def _magnitudes(n1: int, n2: int, device: torch.device) -> torch.Tensor:
    """[0, 2^n2, …, 2^n1] in fp64, indexed by `_magnitude_index`."""
    return torch.tensor([0.0] + [2.0**k for k in range(n2, n1 + 1)], dtype=torch.float64, device=device)


def quantize_pow2(w: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Round weights to {±2^n1, …, ±2^n2, 0} by the paper's Eq. 4, in w's dtype.

    With α < β adjacent in P: β·sgn(w) if (α+β)/2 <= |w| < 3β/2, else 0; so |w| < 2^(n2-1) gives 0,
    and |w| beyond the top bucket gives 2^n1. Zeros are +0.0.
    """
    mag = _magnitudes(n1, n2, w.device)[_magnitude_index(w, n1, n2)]
    # Zero is written as +0.0 even for negative inputs, so the packed artifact round-trips bit for bit.
    return torch.where(mag > 0, torch.where(w < 0, -mag, mag), 0.0).to(w.dtype)


def round_layer(weight: torch.Tensor, bits: int, rule: N1Rule = "max") -> torch.Tensor:
    """A layer's weights all rounded to its power-of-two levels at `bits` (INQ's last step, before any retraining):
    the level set from its non-zero weights by `rule`, zeros staying zero."""
    nonzero = weight[weight != 0]
    return quantize_pow2(weight, *fit_exponents(nonzero, bits, rule)) if nonzero.numel() else weight
