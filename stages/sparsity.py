"""Unstructured sparsity: which weights to zero (the smallest magnitudes, per layer or globally, never a weight an
earlier stage fixed) and the `sparse` artifact format that stores them as a bitmask plus the non-zero values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.artifacts import DenseFP32, register_artifact_format
from pipeline.core.fixed_weights import FixedWeights
from pipeline.core.models import ModelState


def magnitude_masks(
    weights: dict[str, torch.Tensor], fixed: FixedWeights, sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Boolean masks of the weights to zero so that `sparsity` of all weights (per layer or globally) are zero.

    Weights already fixed (pruned zeros, INQ-frozen values) are never chosen; fixed zeros count as pruned.
    """
    masks = {}
    if scope == "layer":
        for name, w in weights.items():
            masks[name] = _smallest(w.abs().flatten(), _free(name, w, fixed), _to_prune(w, name, fixed, sparsity))
        return {n: m.view_as(weights[n]) for n, m in masks.items()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    free = torch.cat([_free(n, w, fixed) for n, w in weights.items()])
    already = sum(int(((w == 0) & ~_free(n, w, fixed).view_as(w)).sum()) for n, w in weights.items())
    chosen = _smallest(flat, free, max(0, math.floor(sparsity * flat.numel()) - already))
    for name, w in weights.items():
        masks[name], chosen = chosen[: w.numel()].view_as(w), chosen[w.numel() :]
    return masks


def _free(name: str, w: torch.Tensor, fixed: FixedWeights) -> torch.Tensor:
    return ~fixed.mask(name).flatten() if name in fixed else torch.ones(w.numel(), dtype=torch.bool)


def _to_prune(w: torch.Tensor, name: str, fixed: FixedWeights, sparsity: float) -> int:
    fixed_zeros = int(((w == 0).flatten() & ~_free(name, w, fixed)).sum())
    return max(0, math.floor(sparsity * w.numel()) - fixed_zeros)


def _smallest(magnitudes: torch.Tensor, free: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` smallest magnitudes among the free entries (ties broken by position)."""
    mask = torch.zeros_like(free)
    count = min(count, int(free.sum()))
    if count > 0:
        candidates = torch.where(free, magnitudes, torch.full_like(magnitudes, float("inf")))
        mask[torch.topk(candidates, count, largest=False, sorted=False).indices] = True
    return mask


@register_artifact_format("sparse")
class SparseBitmask:
    """Tensors that are mostly zero stored as a bitmask (1 bit per weight) plus their non-zero fp32 values.

    Other tensors stay dense. The model runs dense after loading: the CPU kernels do not skip zeros.
    """

    @staticmethod
    def encode(state: ModelState) -> dict[str, Any]:
        payload = DenseFP32.encode(state)
        sparse = {}
        for key, tensor in list(payload["state_dict"].items()):
            nonzero = tensor != 0
            if (
                tensor.is_floating_point()
                and math.ceil(tensor.numel() / 8) + 4 * int(nonzero.sum()) < 4 * tensor.numel()
            ):
                bits = np.packbits(nonzero.flatten().numpy())
                sparse[key] = {"shape": list(tensor.shape), "mask": torch.from_numpy(bits), "values": tensor[nonzero]}
                del payload["state_dict"][key]
        payload["sparse"] = sparse
        return payload

    @staticmethod
    def decode(payload: dict[str, Any], model: nn.Module) -> nn.Module:
        state_dict = dict(payload["state_dict"])
        for key, item in payload["sparse"].items():
            numel = math.prod(item["shape"])
            mask = torch.from_numpy(np.unpackbits(item["mask"].numpy(), count=numel).astype(bool))
            dense = torch.zeros(numel, dtype=item["values"].dtype)
            dense[mask] = item["values"]
            state_dict[key] = dense.view(item["shape"])
        return DenseFP32.decode({**payload, "state_dict": state_dict}, model)
