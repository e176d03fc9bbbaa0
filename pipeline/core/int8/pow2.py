"""int8 scales that keep INQ's powers of two exact: per output channel, a power-of-two step below the channel's
largest magnitude, so that every power-of-two weight within `pow2_octaves(qmax)` octaves of it is an exact integer
(5 with the default scheme's 7-bit weights: 2^5 = 32 <= 63).

INQ with b bits spans 2^(b-2) - 1 octaves: up to 4 bits every channel fits; at 5 bits (7 octaves) a channel that uses
both its largest and its smallest level is put on the next step down instead: its +2^n1 weights clamp to
qmax/(qmax + 1) of their value and, with 7-bit weights (5 octaves), its smallest level sits half a step above zero
(the qat stage counts them). The BatchNorm scale folded into a channel multiplies the whole channel,
so it does not change which weights are exact. A rule of the current weights, not a running statistic: never frozen.
"""

from __future__ import annotations

import math

import torch
from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver


def pow2_octaves(qmax: int) -> int:
    """Octaves below a channel's largest magnitude that weights in [-qmax - 1, qmax] hold exactly on a power-of-two
    step: the largest n with 2^n <= qmax (6 for 127, 5 for 63)."""
    return int(math.floor(math.log2(qmax)))


def pow2_weight_qparams(
    amax: torch.Tensor, min_nonzero: torch.Tensor, qmax: int = 63
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per channel from its largest and smallest non-zero magnitude (see the module)."""
    octaves = pow2_octaves(qmax)
    fits = min_nonzero * 2.0**octaves >= amax
    scale = torch.where(fits, amax / 2.0**octaves, amax / 2.0 ** (octaves + 1))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))  # an all-zero channel: any scale is exact
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def channel_extremes(weight: torch.Tensor, ch_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, max, smallest non-zero magnitude) per channel of `weight` along `ch_axis`."""
    w = weight.detach().float().transpose(0, ch_axis).flatten(1)
    return w.amin(1), w.amax(1), torch.where(w != 0, w.abs(), torch.inf).amin(1)


class PowerOfTwoWeightObserver(PerChannelMinMaxObserver):
    """torchao's per-channel observer with the power-of-two rule above (for the PT2E backend)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("min_nonzero_abs", torch.tensor([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        self.min_val, self.max_val, self.min_nonzero_abs = channel_extremes(x, self.ch_axis)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pow2_weight_qparams(torch.maximum(-self.min_val, self.max_val), self.min_nonzero_abs, self.quant_max)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "min_nonzero_abs"
        if key in state_dict:  # sized by the channel count, like min_val / max_val
            self.min_nonzero_abs = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
