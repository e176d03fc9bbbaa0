"""The preprocessing a run resolves: the model's own for weights (pretrained or a checkpoint), the data's own from
scratch, the recipe's overrides; recorded in the artifact."""

from __future__ import annotations

import timm
import torch
from PIL import Image

from pipeline.core.data import DATASET_STATS, DataConfig, load_data, locate, scan
from pipeline.core.data.preprocessing import resolve_preprocessing
from pipeline.core.models import ModelConfig
from tests.conftest import TINY_MODEL


def _resolve(data: DataConfig, model: ModelConfig, tmp_path=None):
    index = scan(locate(data))
    return resolve_preprocessing(data, model, index, index.files.get("train"), cache_dir=tmp_path)


def test_a_checkpoint_model_is_fed_as_timm_trained_it(photos, tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "mine.pt")
    model = ModelConfig(name="resnet10t", checkpoint=tmp_path / "mine.pt")
    pre = _resolve(DataConfig(dataset="imagefolder", root=photos), model)
    expected = timm.data.resolve_model_data_config(timm.create_model("resnet10t"))
    assert pre.mean == expected["mean"] and pre.std == expected["std"]
    assert pre.input_size == expected["input_size"] == (3, 176, 176)
    assert (pre.interpolation, pre.crop_pct) == (expected["interpolation"], expected["crop_pct"]) == ("bicubic", 0.875)
    assert "timm's config of resnet10t (checkpoint)" in pre.origin


def test_the_recipe_overrides_any_of_it(photos, tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "mine.pt")
    model = ModelConfig(name="resnet10t", checkpoint=tmp_path / "mine.pt")
    data = DataConfig(dataset="imagefolder", root=photos, img_size=64, mean=(0.5, 0.5, 0.5), crop_pct=1.0,
                      interpolation="bilinear")  # fmt: skip
    pre = _resolve(data, model)
    assert pre.input_size == (3, 64, 64) and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.229, 0.224, 0.225)
    assert (pre.interpolation, pre.crop_pct) == ("bilinear", 1.0) and "data.mean" in pre.origin


def test_from_scratch_the_data_is_fed_as_it_is(photos, cifar_root, tmp_path):
    cifar = _resolve(DataConfig(root=cifar_root.parent), ModelConfig(name=TINY_MODEL))
    assert (cifar.mean, cifar.std) == DATASET_STATS["cifar10"] and cifar.input_size == (3, 32, 32)
    assert cifar.crop_pct == 1.0
    pre = _resolve(DataConfig(dataset="imagefolder", root=photos), ModelConfig(name=TINY_MODEL), tmp_path)
    assert pre.input_size == (3, 36, 36)  # the shorter side of the 48x36 photos
    # The statistics are measured image by image on the training images, at the input size.
    transform = timm.data.create_transform((3, 36, 36), crop_pct=1.0, use_prefetcher=True)
    files = sorted((photos / "train").rglob("*.jpg"))
    pixels = torch.stack([transform(Image.open(f).convert("RGB")).double() / 255 for f in files])
    assert torch.allclose(torch.tensor(pre.mean, dtype=torch.float64), pixels.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(torch.tensor(pre.std, dtype=torch.float64), pixels.std(dim=(0, 2, 3)), atol=1e-3)
    assert list(tmp_path.glob("stats-*.json"))  # cached under the data's fingerprint
    assert _resolve(DataConfig(dataset="imagefolder", root=photos), ModelConfig(name=TINY_MODEL), tmp_path) == pre


def test_the_bundle_carries_it_to_the_artifact(photos, tmp_path):
    from pipeline.core.artifacts import load_artifact, save_artifact
    from pipeline.core.models import ModelState, create_model

    bundle = load_data(DataConfig(dataset="imagefolder", root=photos, img_size=40, workers=0),
                       ModelConfig(name=TINY_MODEL))  # fmt: skip
    model, spec = create_model(ModelConfig(name=TINY_MODEL), bundle.num_classes)
    save_artifact(ModelState(model, spec, bundle.preprocessing.to_dict()), tmp_path / "a.pt")
    loaded = load_artifact(tmp_path / "a.pt")
    resolved = timm.data.resolve_model_data_config(loaded)
    assert resolved["input_size"] == (3, 40, 40) and resolved["mean"] == bundle.mean
    assert resolved["interpolation"] == bundle.preprocessing.interpolation
    assert resolved["crop_pct"] == bundle.preprocessing.crop_pct
