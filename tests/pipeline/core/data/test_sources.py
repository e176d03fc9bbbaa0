"""Data sources: locating datasets, their layouts, the fingerprint of their contents, splits and subsets."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.core.data import DataConfig, DataNotFoundError, balanced_subset, locate, scan, stratified_split
from pipeline.core.data.sources import plan_splits
from tests.conftest import make_photos


def test_balanced_subset_is_seeded_and_balanced():
    labels = torch.arange(1000) % 10
    a = balanced_subset(labels, 105, seed=1)
    assert len(a) == 105 and len(set(a.tolist())) == 105
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(a, balanced_subset(labels, 105, seed=1))
    assert not torch.equal(a, balanced_subset(labels, 105, seed=2))
    assert torch.equal(balanced_subset(labels, None, seed=0), torch.arange(1000))


def test_val_split_is_disjoint_stratified_and_identical_across_runs():
    labels = torch.cat([torch.zeros(700, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    kept, held = stratified_split(labels, 0.1, seed=0)
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == 1000
    assert torch.bincount(labels[held]).tolist() == [70, 30]  # the same share of every class
    again_kept, again_held = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=1)[1])


def test_val_split_is_held_out_before_the_training_subset():
    labels = torch.arange(2000) % 10
    full = plan_splits(DataConfig(val_split=0.1), labels, labels[:500])
    small = plan_splits(DataConfig(val_split=0.1, train_subset=300, val_subset=50), labels, labels[:500])
    assert set(full.train.tolist()).isdisjoint(full.val.tolist())
    assert set(small.train.tolist()) <= set(full.train.tolist())  # the subset comes out of the kept images
    assert set(small.val.tolist()) <= set(full.val.tolist()) and len(small.val) == 50
    # The validation images do not depend on the recipe's seed, only on data.split_seed: every seed of a sweep
    # is validated on the same images (the paired tests need it).
    assert torch.equal(plan_splits(DataConfig(), labels, labels).val, full.val)
    assert not torch.equal(plan_splits(DataConfig(split_seed=1), labels, labels).val, full.val)


def test_layouts_decide_which_folder_is_validation_and_which_is_test(tmp_path):
    imagenet = locate(DataConfig(dataset="imagefolder", root=make_photos(tmp_path / "a", {"train": 2, "val": 1})))
    assert (imagenet.test_folder, imagenet.val_folder) == ("val", None)  # val/ is reported; validation from train/
    both = locate(
        DataConfig(dataset="imagefolder", root=make_photos(tmp_path / "b", {"train": 2, "val": 1, "test": 1}))
    )
    assert (both.test_folder, both.val_folder) == ("test", "val")
    cifar_like = locate(DataConfig(dataset="imagefolder", root=make_photos(tmp_path / "c", {"train": 2, "test": 1})))
    assert (cifar_like.test_folder, cifar_like.val_folder) == ("test", None)


def test_fingerprint_changes_with_the_contents(photos):
    source = locate(DataConfig(dataset="imagefolder", root=photos))
    first = scan(source)
    assert len(first.files["train"]) == 30 and first.classes == ["ant", "bee", "cow"]
    assert scan(source).fingerprint == first.fingerprint  # the same files: the same fingerprint
    image = photos / "train" / "bee" / "003.jpg"
    image.write_bytes(image.read_bytes() + b"\0")  # a fixed image (another size)
    fixed = scan(source).fingerprint
    assert fixed != first.fingerprint
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same size, later modification time
    assert scan(source).fingerprint != fixed
    (photos / "train" / "cow" / "new.jpg").write_bytes((photos / "train" / "cow" / "000.jpg").read_bytes())
    assert len(scan(source).files["train"]) == 31


def test_splits_must_list_the_same_classes(tmp_path):
    root = make_photos(tmp_path / "d", {"train": 2, "test": 1})
    (root / "test" / "dog").mkdir()
    with pytest.raises(DataNotFoundError, match="different classes"):
        scan(locate(DataConfig(dataset="imagefolder", root=root)))


def test_missing_data_names_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="cifar10 not found under .*data.download=true"):
        locate(DataConfig())
    with pytest.raises(DataNotFoundError, match="no ImageFolder tree .* train/ and test/ or val/"):
        locate(DataConfig(dataset="imagefolder"))


def test_data_dir_env_is_honoured(imagefolder, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(imagefolder))
    assert locate(DataConfig(dataset="imagefolder")).path == imagefolder.resolve()
