"""A run's data: its three splits, the preprocessing the model is fed with, and the loaders stages train and the
evaluator measures on. `load_data` builds it from a recipe's `data:` and `model:` blocks."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.core.data.augment import BatchAugment, augmented
from pipeline.core.data.config import DataConfig
from pipeline.core.data.memory import Split, TensorLoader, cached_decode, decode_files, torchvision_split
from pipeline.core.data.preprocessing import resolve_preprocessing
from pipeline.core.data.sources import (
    ALL,
    DEFAULT_TEST_SPLIT,
    DataIndex,
    DataSource,
    FileList,
    SplitPlan,
    locate,
    plan_single_tree,
    plan_splits,
    scan,
)
from pipeline.core.data.stream import StreamLoader, default_workers
from pipeline.core.data.transforms import Preprocessing, eval_transform, train_transform
from pipeline.core.models import ModelConfig

log = logging.getLogger("pipeline.core.data")
SPLITS = ("val", "test")  # the splits the evaluator measures: validation (chosen on) and test (reported)


@dataclass
class DataBundle:
    """The training, validation and test images (decoded `Split`s in memory, or `FileList`s streamed from disk),
    class names, the preprocessing, and the settings the loaders follow."""

    train: Split | FileList
    val: Split | FileList | None
    test: Split | FileList
    classes: list[str]
    preprocessing: Preprocessing
    config: DataConfig = field(default_factory=DataConfig)
    fingerprint: str = ""
    skipped_images: int = 0  # unreadable images left out (data.skip_bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.preprocessing.input_size)  # type: ignore[return-value]

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def loader_kind(self) -> str:
        """'memory' or 'stream': how the training images are held."""
        return "memory" if isinstance(self.train, Split) else "stream"

    @property
    def policy(self) -> str:
        """The training augmentation in effect (config.augmentation.policy resolved at this input side)."""
        return self.config.augmentation.resolved_policy(self.preprocessing.side)

    def train_loader(self, batch_size: int, *, seed: int, augment: bool, device: torch.device | str = "cpu"):
        """Shuffled training batches, seeded; under torchrun this rank's part of every global batch of `batch_size`.
        With `augment`, the configured augmentation (batch mixing included)."""
        common = dict(shuffle=True, seed=seed, drop_last=len(self.train) > batch_size, shard=True)
        aug = self.config.augmentation
        if isinstance(self.train, Split):
            loader = TensorLoader(self.train, batch_size, mean=self.mean, std=self.std, augment=augment,
                                  pad=aug.pad, hflip=aug.hflip, **common)  # fmt: skip
        else:
            transform = train_transform(self.preprocessing, aug, self.policy) if augment else eval_transform(
                self.preprocessing)  # fmt: skip
            loader = StreamLoader(self.train, transform, batch_size, mean=self.mean, std=self.std,
                                  workers=self.workers, device=device, persistent=True, **common)  # fmt: skip
        if augment and BatchAugment.needed(aug):
            return MixedLoader(loader, BatchAugment(aug, self.num_classes, seed))
        return loader

    def eval_loader(self, split: str, batch_size: int | None = None):
        """Every image of the `val` or `test` split, in a fixed order, on the CPU (the runtimes read numpy); batches of
        `batch_size`, default the config's evaluation batch at this input side."""
        batch_size = batch_size or self.config.eval_batch(self.preprocessing.side)
        images = self.val if split == "val" else self.test
        if images is None:
            raise ValueError("this data has no validation split (data.val_split is 0 and there is no val/ folder)")
        if isinstance(images, Split):
            return TensorLoader(images, batch_size, mean=self.mean, std=self.std)
        return StreamLoader(images, eval_transform(self.preprocessing), batch_size, mean=self.mean, std=self.std,
                            workers=self.workers)  # fmt: skip

    def with_val_subset(self, images: int | None, seed: int = 0) -> DataBundle:
        """This data with its validation split cut to a fixed random `images` (itself when None or more than it has);
        a choice scored on part of the validation split (sensitivity) reads it."""
        if self.val is None or not len(self.val):
            raise ValueError(
                "this needs a validation split and the data has none: set data.val_split (e.g. 0.1) or add a val/ "
                "folder"
            )
        if images is None or images >= len(self.val):
            return self
        order = torch.randperm(len(self.val), generator=torch.Generator().manual_seed(seed))
        keep = order[:images].sort().values
        val = (
            Split(self.val.images[keep], self.val.labels[keep]) if isinstance(self.val, Split) else self.val.take(keep)
        )
        return replace(self, val=val)

    def val_loader(self, batch_size: int):
        return self.eval_loader("val", batch_size)

    def test_loader(self, batch_size: int):
        return self.eval_loader("test", batch_size)

    @property
    def splits(self) -> tuple[str, ...]:
        """The evaluated splits this data has: ('val', 'test'), or ('test',) without a validation split."""
        return SPLITS if self.val is not None and len(self.val) else ("test",)

    def params(self) -> dict[str, object]:
        """What a run records of its data (MLflow params): how it was loaded and split, its fingerprint, and the
        resolved preprocessing (the numbers the exported model must be fed with)."""
        pre = self.preprocessing
        return {
            "data_loader": self.loader_kind,
            "data_fingerprint": self.fingerprint,
            "train_images": len(self.train),
            "val_images": len(self.val) if self.val is not None else 0,
            "test_images": len(self.test),
            **({"skipped_images": self.skipped_images} if self.skipped_images else {}),
            "augmentation": self.policy if self.config.augment else "none",
            "input_size": "x".join(map(str, pre.input_size)),
            "mean": ",".join(f"{x:.4g}" for x in pre.mean),
            "std": ",".join(f"{x:.4g}" for x in pre.std),
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
            "preprocessing_origin": pre.origin,
        }

    @property
    def workers(self) -> int:
        return self.config.workers if self.config.workers is not None else default_workers()


class MixedLoader:
    """A training loader whose batches go through batch augmentation (mixup, cutmix, random erasing)."""

    def __init__(self, loader, augment: BatchAugment) -> None:
        self.loader, self.augment = loader, augment

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return augmented(self.loader, self.augment)

    def iter_from(self, start: int):
        """An epoch from batch `start` on (a resumed epoch), each batch mixed as in an uninterrupted epoch."""
        self.augment.skip_(start)
        return augmented(self.loader.iter_from(start), self.augment)

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "augment": self.augment.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.augment.generator.set_state(state["augment"])


# --- building it -----------------------------------------------------------------------------------------------


def choose_loader(cfg: DataConfig, source: DataSource, images: int, pre: Preprocessing) -> tuple[str, str]:
    """('memory' | 'stream', why) for `images` images at the input size."""
    decoded_mb = images * math.prod(pre.input_size) / 2**20
    policy = cfg.augmentation.resolved_policy(pre.side) if cfg.augment else "none"
    if source.kind == "torchvision":
        if cfg.loader == "stream":
            raise ValueError("data.loader: stream reads image files; torchvision's CIFAR arrays load in memory")
        return "memory", "torchvision's CIFAR arrays"
    if cfg.loader == "memory" and policy == "random_resized_crop":
        raise ValueError(
            f"data.loader: memory augments tensors (pad_crop_flip), but at {pre.side} px the augmentation is "
            "random_resized_crop: set data.augmentation.policy: pad_crop_flip, or data.loader: stream or auto"
        )
    if cfg.loader != "auto":
        return cfg.loader, f"data.loader: {cfg.loader}"
    if policy == "random_resized_crop" or (cfg.augment and cfg.augmentation.auto_augment):
        return "stream", f"{policy} augments each image as it is read"
    if decoded_mb > cfg.memory_limit_mb:
        return "stream", f"decoded they would take {decoded_mb:,.0f} MB > data.memory_limit_mb {cfg.memory_limit_mb}"
    return "memory", f"decoded they take {decoded_mb:,.0f} MB <= data.memory_limit_mb {cfg.memory_limit_mb}"


def _indices_digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:16]


def load_data(cfg: DataConfig, model: ModelConfig, *, index: DataIndex | None = None,
              cache_dir: Path | None = None) -> DataBundle:  # fmt: skip
    """The run's data: locate and scan it (unless `index` is given), split it, resolve the preprocessing, then hold
    the images in memory (decoded, cached under `cache_dir`) or stream them, as `data.loader` decides."""
    index = index or scan(locate(cfg))
    source = index.source
    if source.kind == "torchvision":
        return _torchvision_bundle(cfg, model, index, cache_dir)
    skipped = len(index.unreadable)
    index = index.check_readable(cfg.skip_bad_images)
    train_files, test_files = index.files[ALL if source.single_tree else "train"], index.files[source.test_folder]
    val_files = index.files[source.val_folder] if source.val_folder else None
    if source.single_tree:
        plan = plan_single_tree(cfg, train_files.labels)
    else:
        plan = plan_splits(cfg, train_files.labels, test_files.labels, val_files.labels if val_files else None)
    pre = resolve_preprocessing(cfg, model, index, train_files.take(plan.train), cache_dir=cache_dir)
    parts = {
        "train": train_files.take(plan.train),
        "val": (val_files if plan.val_from_folder else train_files).take(plan.val),
        "test": test_files.take(plan.test),
    }
    kind, why = choose_loader(cfg, source, sum(len(p) for p in parts.values()), pre)
    if kind == "memory":
        parts = {name: _decoded(name, files, plan, index, pre, cfg, cache_dir) for name, files in parts.items()}
    _log_data(cfg, index, plan, parts, pre, kind, why)
    return DataBundle(parts["train"], parts["val"] if len(plan.val) else None, parts["test"], index.classes, pre,
                      cfg, index.fingerprint, skipped)  # fmt: skip


def _decoded(name: str, files: FileList, plan: SplitPlan, index: DataIndex, pre: Preprocessing, cfg: DataConfig,
             cache_dir: Path | None) -> Split:  # fmt: skip
    """One split decoded into memory, through the decode cache (keyed by the data's fingerprint, the folder, the
    images chosen and the preprocessing that shapes the pixels)."""
    if not len(files):
        return Split(torch.zeros((0, *pre.input_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    source = index.source
    train_folder = ALL if source.single_tree else "train"
    folder = {"train": train_folder, "val": source.val_folder or train_folder, "test": source.test_folder}[name]
    key = {
        "data": index.fingerprint,
        "folder": folder,
        "images": _indices_digest(getattr(plan, name)),
        "preprocessing": {k: v for k, v in pre.to_dict().items() if k not in ("mean", "std")},
    }
    workers = cfg.workers if cfg.workers is not None else default_workers()
    return cached_decode(key, cache_dir, lambda: decode_files(files, pre, workers=workers,
                                                              desc=f"decode {source.dataset}/{name}"))  # fmt: skip


def _torchvision_bundle(cfg: DataConfig, model: ModelConfig, index: DataIndex, cache_dir: Path | None) -> DataBundle:
    """CIFAR from torchvision's arrays: always in memory."""
    pre = resolve_preprocessing(cfg, model, index, None, cache_dir=cache_dir)
    choose_loader(cfg, index.source, 0, pre)  # refuses loader: stream
    train, classes = torchvision_split(index.source, True, cfg.download, pre)
    test, _ = torchvision_split(index.source, False, cfg.download, pre)
    plan = plan_splits(cfg, train.labels, test.labels)
    sources = (("train", train, plan.train), ("val", train, plan.val), ("test", test, plan.test))
    parts = {name: Split(src.images[idx], src.labels[idx]) for name, src, idx in sources}
    _log_data(cfg, index, plan, parts, pre, "memory", "torchvision's CIFAR arrays")
    return DataBundle(parts["train"], parts["val"] if len(plan.val) else None, parts["test"], classes, pre, cfg,
                      index.fingerprint)  # fmt: skip


def _log_data(cfg: DataConfig, index: DataIndex, plan: SplitPlan, parts: dict, pre: Preprocessing, kind: str,
              why: str) -> None:  # fmt: skip
    source = index.source
    pool = "the rest" if source.single_tree else "train/"
    if not len(plan.val):
        val = "no validation split"
    elif plan.val_from_folder:
        val = f"{len(parts['val']):,} val (val/)"
    else:
        val = f"{len(parts['val']):,} val ({cfg.val_split:.0%} of {pool}, held out)"
    if source.single_tree:
        share = cfg.test_split or DEFAULT_TEST_SPLIT
        test = f"{len(parts['test']):,} test ({share:.0%} of every class of one tree of class folders, held out)"
    elif source.kind == "imagefolder":
        test = f"{len(parts['test']):,} test ({source.test_folder}/)"
    else:
        test = f"{len(parts['test']):,} test"
    log.info("data: %s at %s: %s train, %s, %s", source.dataset, source.path, f"{len(parts['train']):,}", val, test)
    log.info("data: loader %s (%s)", kind, why)
    log.info("data: preprocessing %s", pre.describe())
