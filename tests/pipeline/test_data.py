"""Data: locating datasets, seeded class-balanced subsets, decoding, tensor augmentation."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import (
    DataConfig,
    DataNotFoundError,
    Split,
    TensorLoader,
    balanced_subset,
    load_data,
    locate,
    random_crop_flip,
)


def test_balanced_subset_is_seeded_and_balanced():
    labels = torch.arange(1000) % 10
    a = balanced_subset(labels, 105, seed=1)
    assert len(a) == 105 and len(set(a.tolist())) == 105
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(a, balanced_subset(labels, 105, seed=1))
    assert not torch.equal(a, balanced_subset(labels, 105, seed=2))
    assert torch.equal(balanced_subset(labels, None, seed=0), torch.arange(1000))


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


def test_imagefolder_tree_is_decoded(imagefolder, tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=imagefolder)
    bundle = load_data(cfg, seed=0, cache_dir=tmp_path / "decoded")
    assert bundle.classes == ["ant", "bee", "cow"]
    assert bundle.train.images.shape == (18, 3, 12, 12) and bundle.test.images.shape == (9, 3, 12, 12)
    assert bundle.train.images.dtype == torch.uint8
    assert torch.bincount(bundle.train.labels).tolist() == [6, 6, 6]
    # Dataset statistics are computed from the training split for a generic ImageFolder.
    assert bundle.mean[0] < bundle.mean[1]
    cached = load_data(cfg, seed=0, cache_dir=tmp_path / "decoded")  # second load reads the decode cache
    assert torch.equal(cached.train.images, bundle.train.images)
    resized = load_data(cfg.model_copy(update={"img_size": 8}), seed=0)
    assert resized.input_size == (3, 8, 8)


def test_missing_data_names_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="cifar10 not found under .*data.download=true"):
        locate(DataConfig())
    with pytest.raises(DataNotFoundError, match="no ImageFolder tree"):
        locate(DataConfig(dataset="imagefolder"))


def test_data_dir_env_is_honoured(imagefolder, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(imagefolder))
    assert locate(DataConfig(dataset="imagefolder")).path == imagefolder.resolve()


def test_real_cifar10_subset(cifar_root, tmp_path):
    cfg = DataConfig(root=cifar_root.parent, train_subset=50, test_subset=20)
    bundle = load_data(cfg, seed=0, cache_dir=tmp_path)
    assert bundle.num_classes == 10 and bundle.classes[0] == "airplane" and bundle.classes[-1] == "truck"
    assert bundle.input_size == (3, 32, 32)
    assert torch.bincount(bundle.train.labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(bundle.test.labels, minlength=10).tolist() == [2] * 10
