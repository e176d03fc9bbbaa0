"""Weights that training must not change, imposed by earlier stages and kept by the shared loop.

Pruning fixes weights at zero; INQ fixes weights at their power-of-two values. Both are the same
mechanism: a boolean mask per parameter and the values the masked entries must hold. Keeping it
in one place means every later stage's training (fine-tuning, INQ retraining, QAT, distillation)
keeps it without knowing which stage imposed it.

The masks and values are kept on the CPU (they are pickled with the model state) and copied once to the device a
model trains on, then reused every step until the fixed set changes.
"""

from __future__ import annotations

import torch
from torch import nn


class FixedWeights:
    """Per-parameter masks of fixed entries and the values they hold, keyed by parameter name."""

    def __init__(self) -> None:
        self._masks: dict[str, torch.Tensor] = {}
        self._values: dict[str, torch.Tensor] = {}
        self._on_device: dict[torch.device, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def __getstate__(self) -> dict:
        return {"_masks": self._masks, "_values": self._values}  # device copies are rebuilt on demand

    def __setstate__(self, state: dict) -> None:
        self._masks, self._values, self._on_device = state["_masks"], state["_values"], {}

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: str) -> bool:
        return name in self._masks

    def names(self) -> list[str]:
        return list(self._masks)

    def mask(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def values(self, name: str) -> torch.Tensor:
        return self._values[name]

    def fix_(self, name: str, mask: torch.Tensor, values: torch.Tensor) -> None:
        """Fix the entries of `name` where `mask` is true at `values`.

        The set of fixed entries only grows: entries fixed before stay fixed at their old values
        (a weight once frozen is never released nor moved).
        """
        mask = mask.detach().to(torch.bool).cpu()
        values = values.detach().cpu()
        if name in self._masks:
            old_mask, old_values = self._masks[name], self._values[name]
            if old_mask.shape != mask.shape:
                raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != fixed shape {tuple(old_mask.shape)}")
            values = torch.where(old_mask, old_values, values)
            mask = old_mask | mask
        self._masks[name] = mask
        self._values[name] = torch.where(mask, values, torch.zeros_like(values))
        self._on_device = {}

    def index_select_(self, name: str, dim: int, keep: torch.Tensor) -> None:
        """Keep only the entries at `keep` along `dim` (structured pruning removed the rest)."""
        if name in self._masks:
            self._masks[name] = self._masks[name].index_select(dim, keep.cpu())
            self._values[name] = self._values[name].index_select(dim, keep.cpu())
            self._on_device = {}

    def drop_(self, names: list[str]) -> None:
        """Release every entry of these parameters (a stage replaced them by new ones)."""
        for name in names:
            self._masks.pop(name, None)
            self._values.pop(name, None)
        self._on_device = {}

    def fixed_count(self) -> int:
        """Number of fixed weight entries over all parameters."""
        return int(sum(int(m.sum()) for m in self._masks.values()))

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self._masks if n not in params]
        if missing:
            raise KeyError(f"fixed weights name parameters the model does not have: {missing[:5]}")
        return params

    def _device_copies(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The masks and values on `device`, copied there once per change of the fixed set."""
        if device not in self._on_device:
            self._on_device[device] = (
                {n: m.to(device) for n, m in self._masks.items()},
                {n: v.to(device) for n, v in self._values.items()},
            )
        return self._on_device[device]

    @torch.no_grad()
    def project_(self, model: nn.Module) -> None:
        """Restore every fixed entry of `model` to its fixed value, in place."""
        params = self._params(model)
        if not params or not self._masks:
            return
        masks, values = self._device_copies(next(iter(params.values())).device)
        for name, mask in masks.items():
            p = params[name]
            if mask.device != p.device:  # a model spread over devices: copy this one per call
                mask, value = mask.to(p.device), self._values[name].to(p.device)
            else:
                value = values[name]
            p.copy_(torch.where(mask, value.to(p.dtype), p))

    @torch.no_grad()
    def mask_grads_(self, model: nn.Module) -> None:
        """Zero the gradient of fixed entries so optimizer state (momentum) does not build up on them."""
        params = self._params(model)
        if not params or not self._masks:
            return
        masks, _ = self._device_copies(next(iter(params.values())).device)
        for name, mask in masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.masked_fill_(mask.to(grad.device), 0.0)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"masks": dict(self._masks), "values": dict(self._values)}

    @classmethod
    def from_state_dict(cls, state: dict[str, dict[str, torch.Tensor]]) -> FixedWeights:
        fixed = cls()
        fixed._masks = dict(state["masks"])
        fixed._values = dict(state["values"])
        return fixed
