"""Data sources: locating datasets, their layouts, the fingerprint of their contents, splits and subsets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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


def test_fingerprint_changes_with_the_contents(photos, tmp_path):
    source, memo = locate(DataConfig(dataset="imagefolder", root=photos)), tmp_path / "memo"
    first = scan(source, memo)
    assert len(first.files["train"]) == 30 and first.classes == ["ant", "bee", "cow"]
    assert scan(source, memo).fingerprint == first.fingerprint  # the same files: the same fingerprint
    image = photos / "train" / "bee" / "003.jpg"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, the same fingerprint
    assert scan(source, memo).fingerprint == first.fingerprint
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF  # a fixed image of the same size
    image.write_bytes(bytes(data))
    fixed = scan(source, memo).fingerprint
    assert fixed != first.fingerprint
    image.rename(photos / "train" / "bee" / "103.jpg")  # renamed: another file list
    assert scan(source, memo).fingerprint not in (fixed, first.fingerprint)
    (photos / "train" / "cow" / "new.jpg").write_bytes((photos / "train" / "cow" / "000.jpg").read_bytes())
    assert len(scan(source, memo).files["train"]) == 31


def test_a_copy_without_modification_times_keeps_the_fingerprint(photos, tmp_path):
    """A plain copy (new modification times, another folder) is the same data: the same fingerprint, so every cache
    built from the original serves the copy."""
    original = scan(locate(DataConfig(dataset="imagefolder", root=photos)), tmp_path / "memo")
    copy = shutil.copytree(photos, tmp_path / "copy", copy_function=shutil.copy)  # copy: mtimes not kept
    assert (copy / "train" / "ant" / "000.jpg").stat().st_mtime_ns != (
        photos / "train" / "ant" / "000.jpg"
    ).stat().st_mtime_ns
    assert (
        scan(locate(DataConfig(dataset="imagefolder", root=copy)), tmp_path / "memo").fingerprint
        == original.fingerprint
    )


def test_the_memo_spares_reading_unchanged_folders(photos, tmp_path, monkeypatch):
    """A second scan reads no image whose folder's paths, sizes and modification times are unchanged; a touched
    folder is read again, and a memo that is unreadable is only ignored."""
    source, memo = locate(DataConfig(dataset="imagefolder", root=photos)), tmp_path / "memo"
    first = scan(source, memo)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(Path(path)) or real_open(path, *a, **k))
    assert scan(source, memo).fingerprint == first.fingerprint and opened == []
    image = photos / "val" / "cow" / "001.jpg"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert scan(source, memo).fingerprint == first.fingerprint
    assert {p.parent for p in opened} == {photos / "val" / "cow"}  # only the touched class folder is read
    monkeypatch.setattr("builtins.open", real_open)
    for saved in memo.iterdir():
        saved.write_text("{not json")
    assert scan(source, memo).fingerprint == first.fingerprint


def test_the_memo_of_a_deleted_dataset_is_dropped(tmp_path):
    """Memos are one file per dataset folder; a scan's save drops those whose folder is gone (temporary trees)."""
    memo = tmp_path / "memo"
    gone = make_photos(tmp_path / "gone", {"train": 1, "test": 1})
    kept = make_photos(tmp_path / "kept", {"train": 1, "test": 1})
    scan(locate(DataConfig(dataset="imagefolder", root=gone)), memo)
    scan(locate(DataConfig(dataset="imagefolder", root=kept)), memo)
    assert len(list(memo.glob("*.json"))) == 2
    shutil.rmtree(gone)
    (kept / "train" / "ant" / "000.jpg").unlink()  # a change: the next scan saves its memo
    scan(locate(DataConfig(dataset="imagefolder", root=kept)), memo)
    assert [json.loads(f.read_text())["root"] for f in memo.glob("*.json")] == [str(kept.resolve())]


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


def _one_tree(root, per_class: int = 10):
    """The folder users have: class folders directly under `root`, no split."""
    make_photos(root, {"x": per_class}, classes=("ant", "bee", "cow"))
    for cls in ("ant", "bee", "cow"):
        (root / "x" / cls).rename(root / cls)
    (root / "x").rmdir()
    (root / ".ipynb_checkpoints").mkdir()  # not a class
    return root


def test_one_tree_of_class_folders_holds_out_a_seeded_stratified_test_split(tmp_path):
    from pipeline.core.data import load_data
    from pipeline.core.models import ModelConfig
    from tests.conftest import TINY_MODEL

    root = _one_tree(tmp_path / "photos")
    source = locate(DataConfig(dataset="imagefolder", root=root))
    assert source.single_tree and source.test_folder == "all"
    index = scan(source, tmp_path / "memo")
    assert index.classes == ["ant", "bee", "cow"] and len(index.files["all"]) == 30

    def splits(**fields):
        bundle = load_data(DataConfig(dataset="imagefolder", root=root, **fields), ModelConfig(name=TINY_MODEL),
                           index=index)  # fmt: skip
        return bundle

    default = splits()
    assert (len(default.train), len(default.val), len(default.test)) == (24 - 3, 3, 6)  # 20 % of each class tested
    assert default.test.labels.bincount().tolist() == [2, 2, 2]
    a, b = splits(test_split=0.3), splits(test_split=0.3)
    assert torch.equal(a.test.images, b.test.images) and len(a.test) == 9  # seeded by split_seed alone
    seen = [img.flatten().tolist() for part in (a.train, a.val, a.test) for img in part.images]
    assert len({tuple(x) for x in seen}) == len(seen) == 30  # disjoint, and every image used
    other = splits(test_split=0.3, split_seed=1)
    assert not torch.equal(other.test.images, a.test.images)


def test_train_alone_is_one_tree_too_and_test_split_is_refused_where_a_test_split_exists(tmp_path):
    from pipeline.recipe import RecipeError, validate_recipe
    from tests.conftest import tiny_recipe

    lone = make_photos(tmp_path / "lone", {"train": 4})
    assert locate(DataConfig(dataset="imagefolder", root=lone)).tree == "train"
    split = make_photos(tmp_path / "split", {"train": 2, "test": 1})
    data = {"dataset": "imagefolder", "root": str(split), "test_split": 0.2}
    with pytest.raises(RecipeError, match=r"data\.test_split: the data has a test split of its own \(test/ under"):
        validate_recipe(tiny_recipe(data=data))
    assert "test_split" not in DataConfig().model_dump()  # unset: recipes from before keep their cache keys


def test_a_folder_of_datasets_is_not_a_tree_of_class_folders(tmp_path):
    """The shared data folder (cifar10/ with train/ and test/, weights/ with no image) must not pass for a dataset
    whose classes are cifar10 and weights."""
    make_photos(tmp_path / "shared" / "cifar10", {"train": 1, "test": 1})
    (tmp_path / "shared" / "weights").mkdir()
    (tmp_path / "shared" / "weights" / "model.pth").write_bytes(b"0")
    with pytest.raises(DataNotFoundError, match="no ImageFolder tree"):
        locate(DataConfig(dataset="imagefolder", root=tmp_path / "shared"))
