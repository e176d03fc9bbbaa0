"""The streaming path: a torch DataLoader whose workers read and transform files (timm's transforms), so memory is
bounded by batches and workers, whatever the dataset's size.

Reproducible by construction: the batch sampler draws each epoch's order from a generator seeded by (seed, epoch)
and hands every image its own seed, which the worker uses for that image's augmentation; so the batches and
their pixels depend on the seed alone, not on how many workers read them nor on how many ranks share them.
Under torchrun each rank reads only its part of every global batch (as `DistributedSampler` would).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.data.loader import PrefetchLoader, fast_collate

from pipeline.core import distributed
from pipeline.core.data.images import read_rgb
from pipeline.core.data.sources import FileList


class FileDataset(torch.utils.data.Dataset):
    """The images of a `FileList`, decoded with PIL and passed through `transform` (ending in a uint8 tensor).
    An item is an index, or (index, seed) to seed the image's augmentation."""

    def __init__(self, files: FileList, transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = read_rgb(self.files.path(index))
        if seed is None:
            return self.transform(image), int(self.files.labels[index])
        with _own_random_state(seed):  # torchvision's random transforms draw from torch, timm's from `random`
            return self.transform(image), int(self.files.labels[index])


@contextmanager
def _own_random_state(seed: int) -> Iterator[None]:
    """torch's and Python's generators seeded for one image; in the main process (no workers) their state is put
    back after, so reading data never moves the training's random stream."""
    in_worker = torch.utils.data.get_worker_info() is not None
    state = None if in_worker else (torch.random.get_rng_state(), random.getstate())
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if state is not None:
            torch.random.set_rng_state(state[0])
            random.setstate(state[1])


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, image seed) for this rank: each epoch a permutation drawn from (seed, epoch), cut into
    global batches of `batch_size`, of which this rank takes every world-th image."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool, shard: bool) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world = distributed.world() if shard else (0, 1)
        self.epoch = 0
        self.start = 0  # the batch the next epoch starts at (a resumed epoch); back to 0 after it

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=gen)
        self.epoch += 1
        start, self.start = self.start, 0
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world]
            yield list(zip(idx.tolist(), seeds[idx].tolist(), strict=True))


def default_workers() -> int:
    """DataLoader workers per process: one core left to the training step, at least one, at most eight; under
    torchrun the cores are shared by the ranks on a machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // local - 1))


class StreamLoader:
    """Normalised float batches (on `device`) from files read by DataLoader workers; `len()` is batches per epoch.

    Images are collated as uint8 (timm's `fast_collate`) and normalised by timm's `PrefetchLoader` on the device,
    which also overlaps the next batch's copy to a GPU with the current step.
    """

    def __init__(
        self,
        files: FileList,
        transform,
        batch_size: int,
        *,
        mean,
        std,
        workers: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shard: bool = False,
        device: torch.device | str = "cpu",
        persistent: bool = False,
    ) -> None:
        """`persistent`: keep the workers up between passes (a training loader's epochs); an evaluation pass reads
        each image once and lets its workers go when it ends, so no idle workers hold memory beside the next."""
        device = torch.device(device)
        self.batches = EpochBatches(len(files), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                    shard=shard)  # fmt: skip
        loader = torch.utils.data.DataLoader(
            FileDataset(files, transform),
            batch_sampler=self.batches,
            num_workers=workers,
            collate_fn=fast_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=persistent and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # its base seed is drawn from this, not the global stream
        )
        self.loader = PrefetchLoader(loader, mean=tuple(mean), std=tuple(std), device=device)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An epoch's batches from batch `start` on (a resumed epoch); the skipped ones are not read."""
        self.batches.start = start
        return iter(self.loader)

    def state_dict(self) -> dict:
        """Which epoch comes next: every image's order and augmentation follow from it and the seed."""
        return {"epoch": self.batches.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.batches.epoch = state["epoch"]
