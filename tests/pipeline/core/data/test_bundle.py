"""A run's data: which loader `auto` picks and why, the splits of real CIFAR-10."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.core.data import DataConfig, load_data
from pipeline.core.models import ModelConfig
from tests.conftest import TINY_MODEL

MODEL = ModelConfig(name=TINY_MODEL)


def test_auto_holds_small_images_in_memory_and_streams_the_rest(imagefolder, photos, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.core.data")
    small = load_data(DataConfig(dataset="imagefolder", root=imagefolder), MODEL)
    assert small.loader_kind == "memory" and "loader memory (decoded they take" in caplog.text
    over = load_data(DataConfig(dataset="imagefolder", root=imagefolder, memory_limit_mb=0), MODEL)
    assert over.loader_kind == "stream" and "> data.memory_limit_mb 0" in caplog.text
    big = load_data(DataConfig(dataset="imagefolder", root=photos, img_size=96), MODEL)
    assert big.loader_kind == "stream" and "random_resized_crop augments each image as it is read" in caplog.text
    assert "4,000" not in caplog.text and "27 train, 3 val (10% of train/, held out), 12 test (val/)" in caplog.text


def test_memory_cannot_random_resize_crop(photos):
    with pytest.raises(ValueError, match="data.loader: memory augments tensors"):
        load_data(DataConfig(dataset="imagefolder", root=photos, img_size=96, loader="memory"), MODEL)
    with pytest.raises(ValueError, match="random_resized_crop needs loader: stream"):
        DataConfig(loader="memory", augmentation={"policy": "random_resized_crop"})


def test_real_cifar10_subset(cifar_root, tmp_path):
    cfg = DataConfig(root=cifar_root.parent, train_subset=50, val_subset=30, test_subset=20)
    bundle = load_data(cfg, MODEL, cache_dir=tmp_path)
    assert bundle.num_classes == 10 and bundle.classes[0] == "airplane" and bundle.classes[-1] == "truck"
    assert bundle.input_size == (3, 32, 32) and bundle.loader_kind == "memory"
    assert torch.bincount(bundle.train.labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(bundle.val.labels, minlength=10).tolist() == [3] * 10
    assert torch.bincount(bundle.test.labels, minlength=10).tolist() == [2] * 10
    assert bundle.splits == ("val", "test")
    none = load_data(cfg.model_copy(update={"val_split": 0.0}), MODEL, cache_dir=tmp_path)
    assert none.val is None and none.splits == ("test",)


def test_the_evaluation_batch_holds_as_many_pixels_at_any_side():
    assert DataConfig().eval_batch(32) == 512  # CIFAR: as before
    assert DataConfig(batch_size=64).eval_batch(224) == 64  # 224 px: ~10 would hold 512 x 32 x 32; the train batch
    assert DataConfig(batch_size=8).eval_batch(64) == 128
    assert DataConfig(eval_batch_size=100).eval_batch(224) == 100  # set: as set
