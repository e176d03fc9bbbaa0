"""What a sensitivity analysis measures: the techniques and their settings, the layers, how much data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.core.config import StrictConfig


class SensitivityError(ValueError):
    """An analysis that cannot start as asked (an unknown stage or layer, no validation split, bad options)."""


class SensitivityConfig(StrictConfig):
    """The grid of one analysis: every selected layer x every setting of every technique, no retraining."""

    techniques: tuple[str, ...] = Field(
        ("prune", "int8", "inq"),
        min_length=1,
        description="which techniques' settings to try on each layer (registered probes: pipeline.sensitivity.probes)",
    )
    prune_ratios: tuple[float, ...] = Field(
        (0.25, 0.5, 0.75), min_length=1, description="structured pruning: shares of the layer's output channels removed"
    )
    importance: Literal["l1", "l2", "group_norm", "bn_scale", "random"] = Field(
        "group_norm", description="structured pruning: which channels go first (the prune stage's criteria)"
    )
    inq_bits: tuple[int, ...] = Field((3, 4, 5), min_length=1, description="INQ: bit widths to round the layer to")
    calibration_batches: int = Field(
        4, ge=1, le=1000, description="int8: training batches (no augmentation) that calibrate the activation ranges"
    )
    images: int | None = Field(
        None, ge=100, description="validation images scored per setting (a fixed random subset); none: all of them"
    )
    latency: bool = Field(
        True,
        description="also measure each layer's share of the batch-1 forward in ONNX Runtime (its profile, basic graph "
        "optimisations): what pruning or int8 of that layer can save at most",
    )
    layers: tuple[str, ...] = Field(
        (), description="glob patterns of layer names to analyse (e.g. 'layer4.*'); empty: every conv and linear"
    )

    @field_validator("prune_ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < r < 1 for r in ratios):
            raise ValueError(f"pruning ratios must lie strictly between 0 and 1, got {list(ratios)}")
        return tuple(sorted(set(ratios)))

    @field_validator("inq_bits")
    @classmethod
    def _bits_in_range(cls, bits: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 2 <= b <= 8 for b in bits):
            raise ValueError(f"INQ bit widths must be 2..8 (one bit codes zero), got {list(bits)}")
        return tuple(sorted(set(bits)))
