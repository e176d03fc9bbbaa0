"""The preprocessing a model expects, and the per-image transforms (timm's) that produce it.

Every transform here ends in a uint8 CHW tensor: normalisation happens once per batch, on the training device
(`pipeline.core.data.stream`), as timm's own prefetching loader does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.data import create_transform
from torchvision import transforms

from pipeline.core.data.config import AugmentConfig


@dataclass(frozen=True)
class Preprocessing:
    """What a model's input is: side and channels, normalisation (0..1 scale), how an image is resized and
    centre-cropped for evaluation (timm's `pretrained_cfg` keys), and where these values came from (`origin`)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    origin: str = ""

    @property
    def side(self) -> int:
        return self.input_size[-1]

    def to_dict(self) -> dict[str, Any]:
        """The `pretrained_cfg` entries an artifact records (what `timm.data.resolve_model_data_config` reads)."""
        return {
            "input_size": tuple(self.input_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def describe(self) -> str:
        """One line for the log: '3x224x224, bicubic, crop 0.875, mean (0.485, …), std (…) (timm config of …)'."""
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        size = "x".join(map(str, self.input_size))
        return (f"{size}, {self.interpolation}, crop {self.crop_pct:g}, mean {fmt(self.mean)}, std {fmt(self.std)}"
                + (f" ({self.origin})" if self.origin else ""))  # fmt: skip


def eval_transform(pre: Preprocessing):
    """PIL image -> uint8 tensor: timm's evaluation transform (resize the shorter side to side / crop_pct, centre
    crop). An image already at the input side passes unchanged when crop_pct is 1."""
    return create_transform(
        pre.input_size,
        is_training=False,
        interpolation=pre.interpolation,
        crop_pct=pre.crop_pct,
        crop_mode=pre.crop_mode,
        mean=pre.mean,
        std=pre.std,
        use_prefetcher=True,
    )


def train_transform(pre: Preprocessing, aug: AugmentConfig, policy: str):
    """PIL image -> uint8 tensor with the training augmentation of `policy` (batch-level mixing and random erasing
    are applied later, to whole batches: `pipeline.core.data.augment`)."""
    if policy == "random_resized_crop":
        return create_transform(
            pre.input_size,
            is_training=True,
            scale=aug.scale,
            ratio=aug.ratio,
            hflip=aug.hflip,
            color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment,
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
            use_prefetcher=True,
        )
    if policy == "pad_crop_flip":
        steps = [eval_transform(pre), transforms.RandomCrop(pre.input_size[1:], padding=aug.pad)]
        return transforms.Compose(steps + [transforms.RandomHorizontalFlip(aug.hflip)])
    if policy == "none":
        return eval_transform(pre)
    raise ValueError(f"unknown augmentation policy {policy!r}")


__all__ = ["Preprocessing", "eval_transform", "train_transform"]
