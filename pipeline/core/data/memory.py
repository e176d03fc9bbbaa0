"""The in-memory path: every image of a split decoded once into one uint8 tensor, batches cut and augmented as
whole tensors. For small images (CIFAR at 32 px) this beats any per-image loader on a few CPU cores.

Decoded splits are cached on disk keyed by the data's fingerprint and the preprocessing, and read back
memory-mapped, so the ranks of a torchrun job and the workers of a sweep share one copy in the page cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.core import distributed
from pipeline.core.data.augment import apply_crop_flip, crop_flip_draws
from pipeline.core.data.sources import TORCHVISION_LAYOUT, DataNotFoundError, DataSource, FileList
from pipeline.core.data.transforms import Preprocessing
from pipeline.core.hashing import digest

log = logging.getLogger("pipeline.core.data")
DECODE_FORMAT = 2  # part of the decode cache's key: 2 = PIL through timm's eval transform


@dataclass
class Split:
    """Decoded images (N, 3, H, W) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def decoded_bytes(self) -> int:
        return self.images.numel() * self.images.element_size()


class TensorLoader:
    """Yields normalised float batches from an in-memory uint8 split.

    Not a torch DataLoader on purpose: per-sample transforms in worker processes cost more than a training step
    of a small model on a 2-core CPU, while cropping and flipping a whole batch of tensors at once costs almost
    nothing. With `shard`, under torchrun, each rank cuts and augments only its own part of every global batch
    (the random draws are made for the whole batch, so every rank's generator stays in step).
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
        hflip: float = 0.5,
        shard: bool = False,
    ) -> None:
        self.split, self.batch_size = split, batch_size
        self.shuffle, self.augment, self.drop_last, self.pad, self.hflip = shuffle, augment, drop_last, pad, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world = distributed.world() if shard else (0, 1)

    def __len__(self) -> int:
        n = len(self.split.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An epoch's batches from batch `start` on (a resumed epoch): the skipped batches' random draws are made, so
        the rest are the batches an uninterrupted epoch gives, but their images are not cut."""
        n = len(self.split.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            keep = slice(self.rank, None, self.world)
            draws = crop_flip_draws(len(idx), self.pad, self.generator, self.hflip) if self.augment else None
            if b < start:
                continue
            images = self.split.images[idx[keep]]
            if draws is not None:  # drawn for the whole global batch, applied to this rank's part
                images = apply_crop_flip(images, self.pad, *(d[keep] for d in draws))
            yield (images.float() - self.mean) / self.std, self.split.labels[idx[keep]]

    def state_dict(self) -> dict:
        """Where the loader's random stream stands (between epochs): what a resumed run puts back."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def decode_files(files: FileList, pre: Preprocessing, *, workers: int, desc: str) -> Split:
    """Decode every file through the evaluation transform (the same pixels the streaming loader gives), in
    `workers` processes."""
    from pipeline.core.data.stream import FileDataset

    dataset = FileDataset(files, _uint8_eval(pre))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=_stack,
                                         generator=torch.Generator())  # fmt: skip
    images = torch.empty((len(files), *pre.input_size), dtype=torch.uint8)
    done = 0
    for batch, _ in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None):
        images[done : done + len(batch)] = batch
        done += len(batch)
    return Split(images, files.labels.clone())


def _uint8_eval(pre: Preprocessing):
    from pipeline.core.data.transforms import eval_transform

    return eval_transform(pre)


def _stack(batch):
    return torch.stack([image for image, _ in batch]), torch.tensor([label for _, label in batch])


def torchvision_split(source: DataSource, train: bool, download: bool, pre: Preprocessing) -> tuple[Split, list[str]]:
    """CIFAR from torchvision's own layout (arrays), resized to the input side when it differs from 32 px; and the
    class names."""
    from torchvision.transforms.v2 import functional as tvf

    _, cls = TORCHVISION_LAYOUT[source.dataset]
    try:
        ds = cls(str(source.path), train=train, download=download)
    except (OSError, RuntimeError) as err:  # no network, or a corrupt download
        raise DataNotFoundError(f"data.download: could not get {source.dataset} into {source.path}: {err}") from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    if images.shape[-1] != pre.side:
        images = tvf.resize(images, [pre.side, pre.side], antialias=True)
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64)), list(ds.classes)


def cached_decode(key: dict, cache_dir: Path | None, decode) -> Split:
    """`decode()`'s split, stored under `cache_dir` by a digest of `key` (the data's fingerprint, the
    preprocessing, the images chosen) and read back memory-mapped."""
    if cache_dir is None:
        return decode()
    path = Path(cache_dir) / f"decoded-{digest({**key, 'format': DECODE_FORMAT})[:20]}.pt"
    if not path.exists():
        split = decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": split.images, "labels": split.labels}, tmp)
        os.replace(tmp, path)
    blob = torch.load(path, weights_only=True, mmap=True)
    return Split(blob["images"], blob["labels"])
