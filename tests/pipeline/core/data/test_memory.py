"""The in-memory path: batch augmentation of uint8 tensors, the tensor loader, the decode cache."""

from __future__ import annotations

import torch

from pipeline.core.data import DataConfig, Split, TensorLoader, load_data, random_crop_flip
from pipeline.core.models import ModelConfig
from tests.conftest import TINY_MODEL

MODEL = ModelConfig(name=TINY_MODEL)


def test_random_crop_flip_moves_pixels_but_keeps_content():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    same = random_crop_flip(images, pad=0, generator=gen)  # no padding: only flips
    for original, out in zip(images, same, strict=True):
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    cropped = random_crop_flip(images, pad=4, generator=gen)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    assert (cropped == 0).any()  # some padding came in
    assert not torch.equal(cropped, images)


def test_tensor_loader_batches_and_normalises():
    split = Split(torch.full((10, 3, 4, 4), 128, dtype=torch.uint8), torch.arange(10))
    loader = TensorLoader(split, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batches = list(loader)
    assert len(loader) == 3 and [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.allclose(batches[0][0], torch.full_like(batches[0][0], (128 - 127.5) / 127.5))
    shuffled = TensorLoader(split, 4, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True, seed=3, drop_last=True)
    assert len(shuffled) == 2
    first = torch.cat([y for _, y in shuffled])
    again = torch.cat(
        [y for _, y in TensorLoader(split, 4, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True, seed=3, drop_last=True)]
    )
    assert torch.equal(first, again)


def test_each_rank_augments_only_its_part_of_the_global_batch(monkeypatch):
    split = Split(torch.randint(0, 256, (24, 3, 6, 6), dtype=torch.uint8), torch.arange(24))
    args = dict(mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True, augment=True, seed=7)
    whole = list(TensorLoader(split, 8, **args))
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr("pipeline.core.distributed.world", lambda rank=rank: (rank, 2))
        parts.append(list(TensorLoader(split, 8, shard=True, **args)))
    for b, (images, labels) in enumerate(whole):
        assert parts[0][b][0].shape[0] == 4  # half the global batch each
        assert torch.equal(torch.stack([parts[0][b][1], parts[1][b][1]], 1).flatten(), labels)
        assert torch.equal(parts[0][b][0], images[0::2]) and torch.equal(parts[1][b][0], images[1::2])


def test_imagefolder_in_memory_and_the_decode_cache(imagefolder, tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=imagefolder, loader="memory", val_split=0.34)
    bundle = load_data(cfg, MODEL, cache_dir=tmp_path / "decoded")
    assert bundle.loader_kind == "memory" and bundle.classes == ["ant", "bee", "cow"]
    assert bundle.train.images.shape == (12, 3, 12, 12) and bundle.val.images.shape == (6, 3, 12, 12)
    assert bundle.test.images.shape == (9, 3, 12, 12) and bundle.train.images.dtype == torch.uint8
    assert torch.bincount(bundle.train.labels).tolist() == [4, 4, 4]
    assert bundle.mean[0] < bundle.mean[1]  # statistics of the training images (red grows with the class)
    cached = load_data(cfg, MODEL, cache_dir=tmp_path / "decoded")  # read back from the decode cache
    assert torch.equal(cached.train.images, bundle.train.images)
    resized = load_data(cfg.model_copy(update={"img_size": 8}), MODEL)
    assert resized.input_size == (3, 8, 8) and resized.train.images.shape[-1] == 8


def test_a_changed_image_is_never_served_from_the_decode_cache(imagefolder, tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=imagefolder, loader="memory", val_split=0.0)
    before = load_data(cfg, MODEL, cache_dir=tmp_path / "decoded")
    from PIL import Image

    target = imagefolder / "test" / "bee" / "0.png"
    Image.new("RGB", (12, 12), (255, 255, 255)).save(target)  # the user fixes an image
    after = load_data(cfg, MODEL, cache_dir=tmp_path / "decoded")
    assert after.fingerprint != before.fingerprint
    changed = [i for i in range(len(after.test)) if not torch.equal(after.test.images[i], before.test.images[i])]
    assert len(changed) == 1 and bool((after.test.images[changed[0]] == 255).all())
    assert len(list((tmp_path / "decoded").glob("decoded-*.pt"))) == 4  # the old entries stay; the new key is new


def test_a_resumed_epoch_of_the_tensor_loader_is_the_uninterrupted_one():
    """From the state between epochs and a batch position (what a checkpoint keeps), the in-memory loader gives the
    batches, crops and flips included, that the uninterrupted epoch gives."""
    split = Split(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40))

    def loader():
        return TensorLoader(split, 8, mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True, augment=True, seed=2, pad=2)

    uninterrupted = loader()
    list(uninterrupted)
    state = uninterrupted.state_dict()
    second = list(uninterrupted)
    for start in (0, 2, 4):
        resumed = loader()
        resumed.load_state_dict(state)
        batches = list(resumed.iter_from(start))
        assert len(batches) == len(second) - start
        for (xa, ya), (xb, yb) in zip(batches, second[start:], strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
