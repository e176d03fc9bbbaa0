"""Datasets decoded once into uint8 tensors, with augmentation done on whole batches of tensors.

Supported: CIFAR-10 and CIFAR-100 (an ImageFolder tree, or torchvision's own layout and download)
and any ImageFolder tree with `train/` and `test/` folders. Decoded splits are cached on disk so
later runs start in a second instead of re-decoding 60,000 JPEGs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torchvision
from pydantic import Field
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as tvf
from tqdm.auto import tqdm

from pipeline.config import StrictConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Per-channel statistics of the training splits, the usual normalisation for models trained from scratch.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TORCHVISION_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", torchvision.datasets.CIFAR10),
    "cifar100": ("cifar-100-python", torchvision.datasets.CIFAR100),
}


class DataConfig(StrictConfig):
    """Which dataset, where it lives, and how it is batched."""

    dataset: Literal["cifar10", "cifar100", "imagefolder"] = Field("cifar10", description="dataset kind")
    root: Path | None = Field(None, description="data folder; default $DATA_DIR, else ../shared/data, else ./data")
    download: bool = Field(False, description="download CIFAR with torchvision when it is not found (online)")
    batch_size: int = Field(128, ge=1, le=65536, description="training batch size")
    eval_batch_size: int = Field(512, ge=1, le=65536, description="batch size for accuracy evaluation")
    train_subset: int | None = Field(None, ge=1, description="use this many training images, class-balanced")
    test_subset: int | None = Field(None, ge=1, description="evaluate on this many test images, class-balanced")
    img_size: int | None = Field(None, ge=8, le=1024, description="resize + centre-crop images to this side (px)")
    augment: bool = Field(True, description="random crop (pad 4) and horizontal flip during training")


@dataclass(frozen=True)
class DataSource:
    """A dataset found on disk: `kind` is 'imagefolder' or 'torchvision'."""

    kind: Literal["imagefolder", "torchvision"]
    path: Path
    dataset: str


class DataNotFoundError(ValueError):
    """The dataset folder is missing or has the wrong layout."""


def default_data_root() -> Path:
    """$DATA_DIR, else ../shared/data (beside the project or the working folder) when it exists, else ./data."""
    if os.environ.get("DATA_DIR"):
        return Path(os.environ["DATA_DIR"])
    for candidate in (Path.cwd() / ".." / "shared" / "data", PROJECT_ROOT / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return Path("data")


def _is_imagefolder(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def locate(cfg: DataConfig) -> DataSource:
    """Find the dataset on disk, or say exactly what is missing."""
    root = (cfg.root or default_data_root()).expanduser()
    if cfg.dataset == "imagefolder":
        if _is_imagefolder(root):
            return DataSource("imagefolder", root.resolve(), "imagefolder")
        raise DataNotFoundError(f"no ImageFolder tree with train/ and test/ at {root}")
    if _is_imagefolder(root / cfg.dataset):
        return DataSource("imagefolder", (root / cfg.dataset).resolve(), cfg.dataset)
    if _is_imagefolder(root) and root.name == cfg.dataset:
        return DataSource("imagefolder", root.resolve(), cfg.dataset)
    folder, _ = TORCHVISION_LAYOUT[cfg.dataset]
    if (root / folder).is_dir() or cfg.download:
        return DataSource("torchvision", root.resolve(), cfg.dataset)
    raise DataNotFoundError(
        f"{cfg.dataset} not found under {root} (looked for {root / cfg.dataset}/train|test and {root / folder}); "
        "set data.root or DATA_DIR, or data.download=true to fetch it with torchvision"
    )


@dataclass
class Split:
    """Decoded images (N, 3, H, W) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class DataBundle:
    """Both splits in memory, class names, and the normalisation the model is trained with."""

    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.test.images.shape[1:])  # type: ignore[return-value]

    def train_loader(self, batch_size: int, *, seed: int, augment: bool) -> TensorLoader:
        return TensorLoader(
            self.train,
            batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=True,
            augment=augment,
            seed=seed,
            drop_last=len(self.train.labels) > batch_size,
        )

    def test_loader(self, batch_size: int) -> TensorLoader:
        return TensorLoader(self.test, batch_size, mean=self.mean, std=self.std)


def balanced_subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced subset (classes differ by at most one), sorted."""
    if size is None or size >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [size // len(classes) + (1 if i < size % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for cls, count in zip(classes.tolist(), per_class, strict=True):
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:count]])
    return torch.sort(torch.cat(chosen)).values


def _decode_imagefolder(folder: Path, subset: int | None, seed: int, img_size: int | None, desc: str):
    tree = torchvision.datasets.ImageFolder(folder)  # only walks the tree; the subset is decoded below
    labels = torch.tensor(tree.targets, dtype=torch.int64)
    idx = balanced_subset(labels, subset, seed)
    images = []
    for i in tqdm(idx.tolist(), desc=desc, unit="img", leave=False, mininterval=1.0, disable=None):
        img = decode_image(tree.samples[i][0], mode=ImageReadMode.RGB)
        if img_size is not None:
            img = tvf.center_crop(tvf.resize(img, [img_size], antialias=True), [img_size, img_size])
        images.append(img)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {folder} differ in size ({sorted(shapes)[:3]}…); set data.img_size")
    return Split(torch.stack(images), labels[idx]), tree.classes


def _load_split(source: DataSource, cfg: DataConfig, train: bool, subset: int | None, seed: int):
    split = "train" if train else "test"
    if source.kind == "imagefolder":
        return _decode_imagefolder(source.path / split, subset, seed, cfg.img_size, f"decode {source.dataset}/{split}")
    _, cls = TORCHVISION_LAYOUT[source.dataset]
    try:
        ds = cls(str(source.path), train=train, download=cfg.download)
    except (OSError, RuntimeError) as err:  # no network, or a corrupt download
        raise DataNotFoundError(f"data.download: could not get {source.dataset} into {source.path}: {err}") from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    idx = balanced_subset(labels, subset, seed)
    images = images[idx]
    if cfg.img_size is not None:
        images = tvf.resize(images, [cfg.img_size, cfg.img_size], antialias=True)
    return Split(images, labels[idx]), list(ds.classes)


def _cached_split(source, cfg, train, subset, seed, cache_dir: Path | None):
    if cache_dir is None:
        return _load_split(source, cfg, train, subset, seed)
    ident = hashlib.sha256(f"{source}|{train}|{subset}|{seed}|{cfg.img_size}|v1".encode()).hexdigest()[:16]
    path = cache_dir / f"{source.dataset}-{'train' if train else 'test'}-{ident}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return Split(blob["images"], blob["labels"]), blob["classes"]
    split, classes = _load_split(source, cfg, train, subset, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": split.images, "labels": split.labels, "classes": classes}, tmp)
    os.replace(tmp, path)
    return split, classes


def load_data(
    cfg: DataConfig,
    *,
    seed: int,
    cache_dir: Path | None = None,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataBundle:
    """Decode (or read from the decode cache) both splits of the configured dataset.

    `normalization` (mean, std) overrides the dataset's own statistics, e.g. for pretrained weights.
    """
    source = locate(cfg)
    train, classes = _cached_split(source, cfg, True, cfg.train_subset, seed, cache_dir)
    test, test_classes = _cached_split(source, cfg, False, cfg.test_subset, seed, cache_dir)
    if list(test_classes) != list(classes):  # labels are class indices: both splits must list the same classes
        raise DataNotFoundError(
            f"{source.path}: train/ and test/ hold different classes ({sorted(set(classes) ^ set(test_classes))})"
        )
    if normalization is None:
        normalization = DATASET_STATS.get(source.dataset) or _channel_stats(train.images)
    mean, std = normalization
    return DataBundle(train, test, list(classes), tuple(mean), tuple(std))  # type: ignore[arg-type]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64) / 255.0
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


class TensorLoader:
    """Yields normalised float batches from an in-memory uint8 split.

    Not a torch DataLoader on purpose: per-sample transforms in worker processes cost more than a
    training step of a small model on a 2-core CPU, while cropping and flipping a whole batch of
    tensors at once costs almost nothing.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        mean,
        std,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pad: int = 4,
    ) -> None:
        self.split, self.batch_size = split, batch_size
        self.shuffle, self.augment, self.drop_last, self.pad = shuffle, augment, drop_last, pad
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.split.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.split.images[idx]
            if self.augment:
                images = random_crop_flip(images, self.pad, self.generator)
            yield (images.float() - self.mean) / self.std, self.split.labels[idx]


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels, then a random horizontal flip, per image."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
