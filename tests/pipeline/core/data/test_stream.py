"""The streaming path: a DataLoader over files, reproducible whatever the workers and ranks, the same pixels as the
in-memory path, timm's training transform for photos."""

from __future__ import annotations

import torch

from pipeline.core.data import DataConfig, load_data
from pipeline.core.models import ModelConfig
from tests.conftest import TINY_MODEL

MODEL = ModelConfig(name=TINY_MODEL)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_stream_and_memory_give_the_same_evaluation_pixels(imagefolder):
    base = dict(dataset="imagefolder", root=imagefolder, val_split=0.34)
    memory = load_data(DataConfig(**base, loader="memory"), MODEL)
    stream = load_data(DataConfig(**base, loader="stream", workers=0), MODEL)
    assert stream.loader_kind == "stream" and memory.preprocessing == stream.preprocessing
    for split in ("val", "test"):
        a, b = _batches(memory.eval_loader(split, 4)), _batches(stream.eval_loader(split, 4))
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb) and torch.allclose(xa, xb)


def test_augmented_batches_depend_on_the_seed_not_on_the_workers(photos):
    cfg = DataConfig(dataset="imagefolder", root=photos, loader="stream", img_size=32, workers=0)
    bundle = load_data(cfg, MODEL)
    assert bundle.policy == "pad_crop_flip"  # 32 px: small images are cropped and flipped as CIFAR is
    serial = _batches(bundle.train_loader(8, seed=3, augment=True))
    parallel = _batches(load_data(cfg.model_copy(update={"workers": 2}), MODEL).train_loader(8, seed=3, augment=True))
    assert len(serial) == len(parallel) == 3  # 27 training images, drop_last
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    other = _batches(bundle.train_loader(8, seed=4, augment=True))
    assert not torch.equal(other[0][0], serial[0][0])
    # Reading data never moves the training's own random stream (workers: 0 reads in this process).
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _batches(bundle.train_loader(8, seed=3, augment=True))
    assert torch.equal(torch.rand(3), expected)


def test_photos_get_timms_training_transform_and_each_rank_its_shard(photos, monkeypatch):
    cfg = DataConfig(dataset="imagefolder", root=photos, img_size=96, workers=0)
    bundle = load_data(cfg, MODEL)
    assert bundle.loader_kind == "stream" and bundle.policy == "random_resized_crop"
    (x, y), *_ = _batches(bundle.train_loader(8, seed=0, augment=True))
    assert x.shape == (8, 3, 96, 96) and x.dtype == torch.float32
    whole = _batches(bundle.train_loader(8, seed=0, augment=True))
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr("pipeline.core.distributed.world", lambda rank=rank: (rank, 2))
        shards.append(_batches(bundle.train_loader(8, seed=0, augment=True)))
    for b, (images, labels) in enumerate(whole):
        assert torch.equal(shards[0][b][1], labels[0::2]) and torch.equal(shards[1][b][1], labels[1::2])
        assert torch.equal(shards[0][b][0], images[0::2])  # the same image seeds: the same pixels as one process


def test_mixup_gives_soft_targets(photos):
    cfg = DataConfig(dataset="imagefolder", root=photos, img_size=32, workers=0,
                     augmentation={"mixup": 0.4, "re_prob": 0.5})  # fmt: skip
    loader = load_data(cfg, MODEL).train_loader(8, seed=0, augment=True)
    images, targets = next(iter(loader))
    assert targets.shape == (8, 3) and torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).any()  # mixed


def test_batch_mixing_is_seeded_and_leaves_the_training_stream_alone(photos):
    cfg = DataConfig(dataset="imagefolder", root=photos, img_size=32, workers=0,
                     augmentation={"mixup": 0.4, "cutmix": 1.0, "re_prob": 0.5})  # fmt: skip
    bundle = load_data(cfg, MODEL)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = _batches(bundle.train_loader(8, seed=1, augment=True))
    assert torch.equal(torch.rand(3), expected)
    again = _batches(bundle.train_loader(8, seed=1, augment=True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))


def _resumed_epoch(bundle, start: int):
    """The second epoch of a training loader, from batch `start`, read by a fresh loader put in the first loader's
    state after one epoch: what a resumed run reads."""
    first = bundle.train_loader(8, seed=5, augment=True)
    _batches(first)
    state = first.state_dict()
    fresh = bundle.train_loader(8, seed=5, augment=True)
    fresh.load_state_dict(state)
    return [(x.clone(), y.clone()) for x, y in fresh.iter_from(start)]


def test_a_resumed_epoch_reads_the_batches_an_uninterrupted_one_reads(photos):
    """Checkpoints keep a loader's state between epochs and where the epoch stood (pipeline.core.checkpoints): the
    streaming loader, with batch mixing on top, gives the same batches from there as if it had never stopped."""
    cfg = DataConfig(dataset="imagefolder", root=photos, img_size=32, workers=0, loader="stream",
                     augmentation={"mixup": 0.4, "re_prob": 0.5})  # fmt: skip
    bundle = load_data(cfg, MODEL)
    loader = bundle.train_loader(8, seed=5, augment=True)
    _batches(loader)
    uninterrupted = _batches(loader)  # the second epoch
    for start in (0, 1, 2):
        resumed = _resumed_epoch(bundle, start)
        assert len(resumed) == len(uninterrupted) - start
        for (xa, ya), (xb, yb) in zip(resumed, uninterrupted[start:], strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
