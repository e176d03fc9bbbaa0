"""The `data:` block of a recipe: where the images are, how they are split, preprocessed, augmented and loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from pipeline.core.config import StrictConfig

Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos"]


class AugmentConfig(StrictConfig):
    """Training augmentation (with `data.augment: true`). `policy: auto` crops and flips small images as CIFAR is
    usually trained (pad 4, random crop, flip) and photos as timm trains ImageNet (RandomResizedCrop, flip, colour
    jitter); mixup, cutmix and random erasing act on whole batches under either policy."""

    policy: Literal["auto", "pad_crop_flip", "random_resized_crop"] = Field(
        "auto",
        description="auto: pad_crop_flip when the input side is at most `small_side` px, else random_resized_crop",
    )
    small_side: int = Field(64, ge=8, le=1024, description="auto: the largest input side (px) treated as small")
    pad: int = Field(4, ge=0, le=64, description="pad_crop_flip: zero padding (px) before the random crop")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="random_resized_crop: range of the crop's area as a share of the image"
    )
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="random_resized_crop: range of the crop's aspect ratio (width / height)"
    )
    color_jitter: float = Field(0.4, ge=0, le=1, description="random_resized_crop: brightness/contrast/saturation")
    auto_augment: str | None = Field(
        None, description="random_resized_crop: a timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 or original"
    )
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing: probability per image (timm RandomErasing)")
    mixup: float = Field(0.0, ge=0, le=10, description="mixup alpha (0: off; timm Mixup, soft targets)")
    cutmix: float = Field(0.0, ge=0, le=10, description="cutmix alpha (0: off)")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch gets mixup or cutmix")

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"must be two positive numbers, low <= high, got {list(value)}")
        return value

    @field_validator("auto_augment")
    @classmethod
    def _known_policy(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("rand", "augmix", "original", "v0", "3a", "trivial")):
            raise ValueError(f"not a timm auto-augment policy: {value!r} (e.g. rand-m9-mstd0.5-inc1, original, augmix)")
        return value

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def resolved_policy(self, input_side: int) -> str:
        """The policy that applies at an input of `input_side` px."""
        if self.policy != "auto":
            return self.policy
        return "pad_crop_flip" if input_side <= self.small_side else "random_resized_crop"


class DataConfig(StrictConfig):
    """Which dataset, where it lives, how it is split, preprocessed and batched."""

    dataset: Literal["cifar10", "cifar100", "imagefolder"] = Field("cifar10", description="dataset kind")
    root: Path | None = Field(None, description="data folder; default $DATA_DIR, else ../shared/data, else ./data")
    download: bool = Field(False, description="download CIFAR with torchvision when it is not found (online)")
    batch_size: int = Field(128, ge=1, le=65536, description="training batch size (global, over all ranks)")
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="batch size for accuracy evaluation; default 512 images at 32 px and as many pixels per batch at "
        "larger sides (so memory is set by the batch, not the input size), at least `batch_size`",
    )
    val_split: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of train/ held out as the validation split (seeded, stratified by class) when the "
        "data has no separate validation folder; 0: no validation split (a single run only)",
    )
    test_split: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="share of every class held out as the test split when the data is one tree of class folders "
        "(no test/ or val/ folder); default 0.2 there (seeded, stratified, like val_split)",
    )
    split_seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the validation split and of every subset")
    skip_bad_images: bool = Field(
        False,
        description="leave out images that cannot be decoded (truncated, corrupt), counted on the run; false: such an "
        "image is an error naming it, before any training",
    )
    train_subset: int | None = Field(None, ge=1, description="use this many training images, class-balanced")
    val_subset: int | None = Field(None, ge=1, description="evaluate on this many validation images, class-balanced")
    test_subset: int | None = Field(None, ge=1, description="evaluate on this many test images, class-balanced")
    img_size: int | None = Field(
        None, ge=8, le=1024, description="input side (px); default: the model's when it has weights, else the images'"
    )
    mean: tuple[float, float, float] | None = Field(None, description="normalisation mean (0..1); default resolved")
    std: tuple[float, float, float] | None = Field(None, description="normalisation std (0..1); default resolved")
    interpolation: Interpolation | None = Field(None, description="resize interpolation; default resolved")
    crop_pct: float | None = Field(None, gt=0, le=1, description="centre-crop share of the resized image (eval)")
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="memory: decode once into uint8 tensors (fast for small images); stream: a DataLoader with "
        "workers reading files (memory bounded by batches); auto: memory when the decoded splits fit in "
        "`memory_limit_mb` and the augmentation works on tensors, else stream",
    )
    memory_limit_mb: int = Field(1024, ge=0, le=1_048_576, description="auto: most decoded MB to hold in memory")
    workers: int | None = Field(
        None, ge=0, le=256, description="stream: DataLoader worker processes per rank; default cores - 1 (1..8)"
    )
    augment: bool = Field(True, description="augment training images (see `augmentation`)")
    augmentation: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if std is not None and min(std) <= 0:
            raise ValueError(f"must be positive, got {list(std)}")
        return std

    def eval_batch(self, side: int) -> int:
        """The evaluation batch size at an input of `side` px (see `eval_batch_size`)."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return max(self.batch_size, 512 * 32 * 32 // (side * side))

    @model_serializer(mode="wrap")
    def _test_split_only_when_set(self, handler) -> dict[str, Any]:
        """test_split is left out while unset, so recipes written before it existed keep their cache keys."""
        data = handler(self)
        if self.test_split is None:
            data.pop("test_split", None)
        return data

    @model_validator(mode="after")
    def _tensor_augmentation_in_memory(self) -> DataConfig:
        if self.loader == "memory" and self.augment and self.augmentation.policy == "random_resized_crop":
            raise ValueError(
                "loader: memory augments whole batches of tensors (pad_crop_flip); "
                "random_resized_crop needs loader: stream (or auto)"
            )
        if self.loader == "memory" and self.augment and self.augmentation.auto_augment:
            raise ValueError("augmentation.auto_augment works on images as they are read: use loader: stream (or auto)")
        return self


# Data settings that change only evaluation, not what a stage trains; they key metrics, not models.
DATA_VERSION = 1
"""Version of what the data code gives training (splits, decoding, augmentation, normalisation): in every stage cache
key; bump it when a change of pipeline/core/data changes the pixels or the order a stage trains on."""
EVAL_ONLY_FIELDS = frozenset({"val_subset", "test_subset", "eval_batch_size"})
# Settings that change neither what is trained nor what is measured (where the data is; how many workers read it).
# skip_bad_images: with no unreadable image it changes nothing, and with one, false stops the run before it starts.
NEUTRAL_FIELDS = frozenset({"root", "download", "workers", "skip_bad_images"})
