"""Which preprocessing a run uses, resolved once from the model, the data and the recipe.

A model that starts from weights (timm's pretrained ones or a checkpoint) is fed as those weights were trained:
timm's data config for the model (`timm.data.resolve_model_data_config`: input size, mean, std, interpolation,
crop_pct). A model trained from scratch is fed the data as it is: the images' own side, no crop, and the dataset's
channel statistics (CIFAR's published ones, else measured on a sample of training images). `data.img_size`,
`data.mean`, `data.std`, `data.interpolation` and `data.crop_pct` override any of them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import timm
import torch
from PIL import Image

from pipeline.core.data.config import DataConfig
from pipeline.core.data.images import read_rgb
from pipeline.core.data.sources import (
    ALL,
    CIFAR_SIDE,
    IMAGE_EXTENSIONS,
    DataIndex,
    DataSource,
    FileList,
    balanced_subset,
)
from pipeline.core.data.transforms import Preprocessing, eval_transform
from pipeline.core.models import ModelConfig

log = logging.getLogger("pipeline.core.data")

# Per-channel statistics of the training splits, the usual normalisation for CIFAR models trained from scratch.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
STATS_SAMPLE = 1000  # training images the statistics of a from-scratch ImageFolder are measured on


def has_weights(model: ModelConfig) -> bool:
    """Whether the model starts from trained weights (pretrained or a checkpoint), whose preprocessing it keeps."""
    return model.pretrained or model.checkpoint is not None


def model_data_config(model: ModelConfig) -> dict:
    """timm's data config of the model as the recipe builds it (on the meta device: no memory, no weights)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        module = timm.create_model(model.name, pretrained=False, **model.kwargs)
    return timm.data.resolve_model_data_config(module)


def first_image(source: DataSource) -> Path | None:
    """The first training image in the order a scan finds files (sorted classes, sorted walk), read cheaply."""
    train = source.folder_path(ALL) if source.single_tree else source.path / "train"
    for name in sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")):
        for dirpath, dirnames, filenames in sorted(os.walk(train / name, followlinks=True)):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    return Path(dirpath) / filename
    return None


def native_side(source: DataSource) -> int:
    """The side of the images as they are: CIFAR's 32, else the shorter side of the first training image."""
    first = first_image(source) if source.kind == "imagefolder" else None
    if first is None:
        return CIFAR_SIDE
    with Image.open(first) as image:  # reads the header only
        return min(image.size)


def input_size(data: DataConfig, model: ModelConfig, source: DataSource,
               timm_cfg: dict | None = None) -> tuple[int, int, int]:  # fmt: skip
    """(3, H, W) the model is fed: `data.img_size`, else for a model with weights its own (`model.kwargs.img_size`
    or timm's config), else the images' native side."""
    if data.img_size is not None:
        return (3, data.img_size, data.img_size)
    if has_weights(model) and isinstance(model.kwargs.get("img_size"), int):
        return (3, model.kwargs["img_size"], model.kwargs["img_size"])
    if has_weights(model):
        return tuple((timm_cfg or model_data_config(model))["input_size"])  # type: ignore[return-value]
    side = native_side(source)
    return (3, side, side)


def resolve_preprocessing(
    data: DataConfig, model: ModelConfig, index: DataIndex, train: FileList | None, *, cache_dir: Path | None
) -> Preprocessing:
    """The run's preprocessing (see the module docstring); `train` are the training images, for statistics."""
    weights = has_weights(model)
    timm_cfg = model_data_config(model) if weights else {}
    side = input_size(data, model, index.source, timm_cfg)
    pre = Preprocessing(
        input_size=side,  # type: ignore[arg-type]
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation=data.interpolation or timm_cfg.get("interpolation", "bilinear"),
        crop_pct=data.crop_pct or timm_cfg.get("crop_pct", 1.0),
        crop_mode=timm_cfg.get("crop_mode", "center"),
    )
    if data.mean is not None and data.std is not None:
        mean, std, origin = data.mean, data.std, "the recipe's"
    elif weights:
        mean, std = timm_cfg["mean"], timm_cfg["std"]
        origin = f"timm's config of {model.name} ({'pretrained' if model.pretrained else 'checkpoint'})"
    elif index.source.dataset in DATASET_STATS:
        (mean, std), origin = DATASET_STATS[index.source.dataset], f"{index.source.dataset} statistics"
    else:
        mean, std = sampled_statistics(train, pre, index.fingerprint, cache_dir)
        origin = f"statistics of {min(STATS_SAMPLE, len(train))} training images"
    overridden = [f"data.{k}" for k in ("img_size", "mean", "std", "interpolation", "crop_pct") if getattr(data, k)]
    if overridden:
        origin += "; set by the recipe: " + ", ".join(overridden)
    mean, std = tuple(data.mean or mean), tuple(data.std or std)
    return Preprocessing(side, mean, std, pre.interpolation, pre.crop_pct, pre.crop_mode, origin)  # type: ignore


def sampled_statistics(
    files: FileList | None, pre: Preprocessing, fingerprint: str, cache_dir: Path | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1) of up to STATS_SAMPLE class-balanced training images as the model sees them
    (evaluation transform), accumulated image by image; cached beside the decoded data under the data's
    fingerprint."""
    if files is None or not len(files):
        raise ValueError("dataset statistics need training images")
    key = f"stats-{fingerprint}-{'x'.join(map(str, pre.input_size))}-{pre.interpolation}-{pre.crop_pct:g}.json"
    path = Path(cache_dir) / key if cache_dir is not None else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        return tuple(stored["mean"]), tuple(stored["std"])
    chosen = files.take(balanced_subset(files.labels, STATS_SAMPLE, seed=0))
    transform = eval_transform(pre)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for i in range(len(chosen)):
        x = transform(read_rgb(chosen.path(i))).to(torch.float64) / 255.0
        total += x.sum(dim=(1, 2))
        squares += (x * x).sum(dim=(1, 2))
        pixels += x.shape[1] * x.shape[2]
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(1e-12).sqrt()
    out = tuple(mean.tolist()), tuple(std.tolist())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"mean": out[0], "std": out[1], "images": len(chosen)}))
        os.replace(tmp, path)
    log.info("data: mean %s, std %s measured on %d training images", out[0], out[1], len(chosen))
    return out  # type: ignore[return-value]
