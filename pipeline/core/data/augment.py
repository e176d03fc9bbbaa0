"""Augmentation of whole batches: pad-crop-flip of uint8 tensors (the in-memory loader), and mixup / cutmix /
random erasing of normalised batches (either loader), all drawn from the loader's own seeded generator."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from pipeline.core.data.config import AugmentConfig


def crop_flip_draws(batch: int, pad: int, generator: torch.Generator, hflip: float = 0.5):
    """The random offsets (y, x) and flips of `random_crop_flip` for `batch` images."""
    oy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    return oy, ox, torch.rand(batch, generator=generator) < hflip


def apply_crop_flip(images: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor):
    """Crop each image at its offset after zero padding by `pad` pixels, and flip those marked in `flip`."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator, hflip: float = 0.5) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels, then a horizontal flip with probability `hflip`, per image."""
    return apply_crop_flip(images, pad, *crop_flip_draws(images.shape[0], pad, generator, hflip))


@contextmanager
def _seeded_globals(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """timm's Mixup and RandomErasing draw from numpy's, Python's and torch's global generators (random erasing's
    noise on the batch's device): seed them all from `generator` for the call, then put back what they held, so a run
    is reproducible and the training's own random stream does not move."""
    seed = _batch_seed(generator)
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _batch_seed(generator: torch.Generator) -> int:
    """One batch's seed: the only draw a batch makes from the augmentation's own generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


class BatchAugment:
    """Mixup / cutmix (soft targets, shape batch x classes) and random erasing of normalised batches."""

    def __init__(self, aug: AugmentConfig, num_classes: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.mixup = (
            Mixup(
                mixup_alpha=aug.mixup,
                cutmix_alpha=aug.cutmix,
                prob=aug.mix_prob,
                label_smoothing=0.0,
                num_classes=num_classes,
            )  # fmt: skip
            if aug.mixes
            else None
        )  # label smoothing stays the loss's (TrainConfig.label_smoothing), which applies to soft targets too
        self.re_prob = aug.re_prob

    def skip_(self, batches: int) -> None:
        """Advance the generator past `batches` batches without augmenting them (a resumed epoch)."""
        for _ in range(batches):
            _batch_seed(self.generator)

    @staticmethod
    def needed(aug: AugmentConfig) -> bool:
        return aug.mixes or aug.re_prob > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _seeded_globals(self.generator, images.device):
            if self.re_prob > 0:
                images = RandomErasing(self.re_prob, mode="pixel", device=images.device)(images)
            if self.mixup is not None:
                if images.shape[0] % 2:  # timm mixes pairs: an odd last image stays as it is
                    head, tail = self.mixup(images[:-1], labels[:-1]), (images[-1:], labels[-1:])
                    onehot = torch.nn.functional.one_hot(tail[1], self.mixup.num_classes).to(head[1].dtype)
                    return torch.cat([head[0], tail[0]]), torch.cat([head[1], onehot])
                images, labels = self.mixup(images, labels)
        return images, labels


def augmented(batches, augment: BatchAugment | None):
    """`batches` with `augment` applied to each (images, labels) pair."""
    for images, labels in batches:
        yield augment(images, labels) if augment is not None else (images, labels)
