"""Where a dataset is, which files it holds, and how they are split into training, validation and test images.

Layouts: an ImageFolder tree (`train/` plus `test/` and/or `val/`, one folder per class), a single tree of class
folders with no split (the folder a user has: `root/<class>/…`, or `root/train/<class>/…` alone), or torchvision's
CIFAR arrays (`cifar-10-batches-py`). Which split is which:

| folders                 | validation split                   | test split (reported)                |
| ----------------------- | ---------------------------------- | ------------------------------------ |
| train/, test/           | `val_split` of train/              | test/                                |
| train/, val/            | `val_split` of train/              | val/ (ImageNet's)                    |
| train/, val/, test/     | val/                               | test/                                |
| one tree of class folders | `val_split` of what is not test | `test_split` of every class (0.2)   |

`scan` walks the tree once: the file index (paths and labels, compact) and a fingerprint of its contents (every
file's relative path and bytes), which keys every cache built from the data. Reading every byte on every run would
cost minutes on a million photos, so each class folder's content digest is remembered (`FingerprintMemo`, under the
cache folder) against its files' paths, sizes and modification times: an unchanged folder is not read again, a
touched or copied one is read once, and a copy of the data (plain `cp`, a restore, another machine) has the same
fingerprint as the original, so its caches stay valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision

from pipeline.core.data.config import DataConfig
from pipeline.core.data.images import unreadable
from pipeline.core.hashing import update_with_file
from pipeline.core.paths import PROJECT_ROOT, default_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
TORCHVISION_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", torchvision.datasets.CIFAR10),
    "cifar100": ("cifar-100-python", torchvision.datasets.CIFAR100),
}
CIFAR_SIDE = 32
FINGERPRINT_FORMAT = 2  # 2: file contents (1 was paths, sizes and modification times)
MEMO_FORMAT = 2  # 2: each folder's unreadable files beside its digest

log = logging.getLogger("pipeline")


class DataNotFoundError(ValueError):
    """The dataset folder is missing or has the wrong layout."""


ALL = "all"
"""The one split of a single tree of class folders (test, validation and training images are drawn from it)."""
DEFAULT_TEST_SPLIT = 0.2
"""The share of each class a single tree of class folders holds out as the test split, unless `data.test_split`."""


@dataclass(frozen=True)
class DataSource:
    """A dataset found on disk: `kind` is 'imagefolder' or 'torchvision'; `folders` the ImageFolder splits present
    (`(ALL,)` for a single tree of class folders, which lives in `tree`: '' for the root itself, or 'train')."""

    kind: Literal["imagefolder", "torchvision"]
    path: Path
    dataset: str
    folders: tuple[str, ...] = ()
    tree: str | None = None

    @property
    def single_tree(self) -> bool:
        """One tree of class folders, no split of its own: the test split is held out of it (`test_split`)."""
        return self.tree is not None

    @property
    def test_folder(self) -> str:
        """The folder that is reported as the test split: test/, else val/ (ImageNet's layout); ALL for one tree."""
        return ALL if self.single_tree else "test" if "test" in self.folders else "val"

    @property
    def val_folder(self) -> str | None:
        """The folder used as the validation split, when the tree has both val/ and test/; else None."""
        return "val" if {"val", "test"} <= set(self.folders) else None

    def folder_path(self, name: str) -> Path:
        """Where split folder `name` is on disk."""
        return self.path / self.tree if name == ALL else self.path / name


def default_data_root() -> Path:
    """$DATA_DIR, else ../shared/data (beside the project or the working folder) when it exists, else ./data."""
    if os.environ.get("DATA_DIR"):
        return Path(os.environ["DATA_DIR"])
    for candidate in (Path.cwd() / ".." / "shared" / "data", PROJECT_ROOT / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return Path("data")


def _splits_present(path: Path) -> tuple[str, ...] | None:
    """The ImageFolder split folders under `path` (train/ and at least one of test/, val/), else None."""
    present = tuple(name for name in ("train", "val", "test") if (path / name).is_dir())
    return present if "train" in present and len(present) > 1 else None


def _single_tree(path: Path) -> str | None:
    """'' when `path` is itself a tree of class folders, 'train' when it holds train/ alone; else None. A tree of class
    folders has two or more (not hidden), each holding an image somewhere, and none holding split folders (a folder of
    datasets, such as the shared data folder, is not one)."""
    if not path.is_dir():
        return None
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if folders == ["train"]:
        return "train" if _single_tree(path / "train") == "" else None
    if len(folders) < 2 or {"train", "val", "test"} & set(folders):
        return None
    if any(_splits_present(path / f) or not _holds_an_image(path / f) for f in folders):
        return None
    return ""


def _holds_an_image(folder: Path) -> bool:
    """Whether an image file is somewhere under `folder` (stops at the first)."""
    for _dirpath, _dirnames, filenames in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames):
            return True
    return False


def locate(cfg: DataConfig) -> DataSource:
    """Find the dataset on disk, or say exactly what is missing."""
    root = (cfg.root or default_data_root()).expanduser()
    candidates = (
        [root] if cfg.dataset == "imagefolder" else [root / cfg.dataset] + ([root] * (root.name == cfg.dataset))
    )
    for path in candidates:
        if folders := _splits_present(path):
            return DataSource("imagefolder", path.resolve(), cfg.dataset, folders)
    if cfg.dataset == "imagefolder" and (tree := _single_tree(root)) is not None:
        return DataSource("imagefolder", root.resolve(), cfg.dataset, (ALL,), tree)
    if cfg.dataset == "imagefolder":
        raise DataNotFoundError(
            f"no ImageFolder tree at {root}: it needs class folders (one per class, the images inside), either "
            "directly or split into train/ and test/ or val/ (or all three)"
        )
    folder, _ = TORCHVISION_LAYOUT[cfg.dataset]
    if (root / folder).is_dir() or cfg.download:
        return DataSource("torchvision", root.resolve(), cfg.dataset)
    raise DataNotFoundError(
        f"{cfg.dataset} not found under {root} (looked for {root / cfg.dataset}/train|test and {root / folder}); "
        "set data.root or DATA_DIR, or data.download=true to fetch it with torchvision"
    )


@dataclass(frozen=True)
class FileList:
    """The image files of one folder split: paths relative to `root` (compact bytes, cheap to share with
    DataLoader workers) and their class indices."""

    root: Path
    paths: np.ndarray  # dtype S: relative paths, utf-8
    labels: torch.Tensor  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i].decode()

    def take(self, indices: torch.Tensor) -> FileList:
        idx = indices.numpy()
        return FileList(self.root, self.paths[idx], self.labels[indices])


@dataclass(frozen=True)
class DataIndex:
    """What `scan` found: the source, its classes, each folder split's files (empty for torchvision's layout) and
    the fingerprint of the contents."""

    source: DataSource
    classes: list[str]
    files: dict[str, FileList]
    fingerprint: str
    unreadable: dict[str, str] = field(default_factory=dict)  # '<split>/<relative path>' -> why it cannot be decoded

    def count(self, folder: str) -> int:
        return len(self.files[folder]) if folder in self.files else 0

    def without_unreadable(self) -> DataIndex:
        """The index with the unreadable files left out of every split (`data.skip_bad_images`)."""
        files = {}
        for name, listed in self.files.items():
            bad = {p.encode() for key in self.unreadable if key.startswith(f"{name}/") for p in [key[len(name) + 1 :]]}
            keep = torch.tensor([p not in bad for p in listed.paths], dtype=torch.bool)
            files[name] = listed.take(torch.nonzero(keep).flatten())
        return DataIndex(self.source, self.classes, files, self.fingerprint, {})

    def check_readable(self, skip: bool) -> DataIndex:
        """The index ready to load: unchanged when every image decodes; without the unreadable ones when `skip`
        (logged); else a DataNotFoundError naming them."""
        if not self.unreadable:
            return self
        named = ", ".join(f"{path} ({why})" for path, why in list(self.unreadable.items())[:5])
        more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
        if not skip:
            raise DataNotFoundError(
                f"{self.source.path}: {len(self.unreadable)} image(s) cannot be read: {named}{more}; fix or remove "
                "them, or set data.skip_bad_images: true to leave them out (counted on the run)"
            )
        log.warning("data: leaving out %d unreadable image(s) (data.skip_bad_images): %s%s", len(self.unreadable),
                    named, more)  # fmt: skip
        return self.without_unreadable()


class FingerprintMemo:
    """Content digests of folders already read, keyed by what `os.stat` says of their files (relative path, size,
    modification time), so a folder whose files were not touched is not read again; with each digest, the files of
    the folder no image decoder reads (`images.unreadable`: truncated, corrupt, not an image), found in the same
    pass. One small JSON file per dataset root under `folder` (one entry per class folder), written atomically;
    saving drops the files of roots that no longer exist. A memo that cannot be read or written only costs a
    re-read (logged)."""

    def __init__(self, folder: Path, root: Path):
        self.root, self.folder = str(root), folder
        # The format is in the name: a version of this tool that writes another format never reads this file, nor
        # this one its file (both may share one cache folder).
        self.path = folder / f"{hashlib.sha256(self.root.encode()).hexdigest()[:16]}.v{MEMO_FORMAT}.json"
        self.known: dict[str, dict] = {}
        self.seen: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())["folders"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignoring an unreadable fingerprint memo %s", self.path)

    def content_digest(
        self, base: Path, files: list[tuple[str, os.stat_result]], *, images: bool = True
    ) -> tuple[str, dict[str, str]]:
        """(sha256 of the files' relative paths and bytes, {relative path: why it cannot be decoded}); the files are
        read (and, `images`, decoded) only when their stat listing is new."""
        listing = hashlib.sha256(str(base).encode())
        for rel, st in files:
            listing.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        stat_key = listing.hexdigest()
        entry = self.known.get(stat_key)
        if entry is None:
            h, bad = hashlib.sha256(), {}
            for rel, st in files:
                h.update(f"{rel}\0{st.st_size}\n".encode())
                update_with_file(h, base / rel)
                if images and (why := unreadable(base / rel)) is not None:
                    bad[rel] = why
            entry = {"digest": h.hexdigest(), "unreadable": bad}
        self.seen[stat_key] = entry
        return entry["digest"], entry["unreadable"]

    def save(self) -> None:
        if self.seen == self.known:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"root": self.root, "folders": self.seen}, sort_keys=True))
            os.replace(tmp, self.path)
            for other in self.folder.glob("*.json"):  # the memos of datasets deleted since (temporary folders)
                try:
                    if other != self.path and not Path(json.loads(other.read_text())["root"]).exists():
                        other.unlink()
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        except OSError as e:
            log.warning("could not save the fingerprint memo %s (%s): the next run reads the data again", self.path, e)


def _walk_folder(folder: Path, h, memo: FingerprintMemo) -> tuple[list[str], list[bytes], list[int], dict[str, str]]:
    """(classes, relative paths, labels, unreadable files) of one split folder, as torchvision's ImageFolder finds
    them (hidden folders, such as .ipynb_checkpoints, are not classes); feeds each class folder's content digest
    into the hash `h`."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    paths, labels, bad = [], [], {}
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in sorted(os.walk(folder / name, followlinks=True)):
            dirnames.sort()
            for filename in sorted(filenames):
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, filename)
                found.append((os.path.relpath(full, folder), os.stat(full)))
        digest, unreadable_here = memo.content_digest(folder, found)
        h.update(f"{name}\0{len(found)}\0{digest}\n".encode())
        paths.extend(rel.encode() for rel, _ in found)
        labels.extend([label] * len(found))
        bad.update(unreadable_here)
    return classes, paths, labels, bad


def scan(source: DataSource, memo_dir: Path | None = None) -> DataIndex:
    """Walk the dataset once: every split folder's files and the fingerprint of the whole dataset (its contents:
    see the module's note). Content digests are remembered under `memo_dir` (default: the cache folder's
    `fingerprints/`)."""
    h = hashlib.sha256(f"{FINGERPRINT_FORMAT}|{source.kind}|{source.dataset}".encode())
    memo = FingerprintMemo(memo_dir or default_cache_dir() / "fingerprints", source.path)
    files, classes, bad = {}, None, {}
    if source.kind == "torchvision":
        folder, _ = TORCHVISION_LAYOUT[source.dataset]
        base = source.path / folder
        found = (
            [(str(e.relative_to(base)), e.stat()) for e in sorted(base.rglob("*")) if e.is_file()]
            if base.is_dir()
            else []
        )
        h.update(memo.content_digest(base, found, images=False)[0].encode())
        memo.save()
        return DataIndex(source, [], {}, h.hexdigest()[:24])
    for name in source.folders:
        h.update(f"[{name}]".encode())
        found, paths, labels, unreadable_here = _walk_folder(source.folder_path(name), h, memo)
        bad.update({f"{name}/{rel}": why for rel, why in unreadable_here.items()})
        if classes is None:
            classes = found
        elif found != classes:  # labels are class indices: every split must list the same classes
            raise DataNotFoundError(
                f"{source.path}: train/ and {name}/ hold different classes ({sorted(set(classes) ^ set(found))[:6]})"
            )
        if not paths:
            raise DataNotFoundError(f"{source.path / name}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        files[name] = FileList(source.folder_path(name), np.array(paths, dtype=bytes), torch.tensor(labels))
    memo.save()
    return DataIndex(source, classes or [], files, h.hexdigest()[:24], bad)


def class_names(source: DataSource) -> list[str]:
    """The class folders of train/ (sorted), or CIFAR's classes; cheap (no file walk)."""
    if source.kind == "imagefolder":
        folder = source.folder_path(ALL) if source.single_tree else source.path / "train"
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    return [str(i) for i in range(100 if source.dataset == "cifar100" else 10)]


# --- splits and subsets: pure functions of labels and a seed -----------------------------------------------


def balanced_subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded, class-balanced subset (classes differ by at most one), sorted."""
    if size is None or size >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [size // len(classes) + (1 if i < size % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for cls, count in zip(classes.tolist(), per_class, strict=True):
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:count]])
    return torch.sort(torch.cat(chosen)).values


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) sorted indices: `fraction` of every class held out (rounded, at least one image of a class
    with two or more), chosen with `seed`. The same labels, fraction and seed give the same split."""
    if fraction <= 0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    held = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held.append(members[torch.randperm(len(members), generator=gen)[:count]])
    out = torch.sort(torch.cat(held)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[out] = False
    return torch.nonzero(keep).flatten(), out


@dataclass(frozen=True)
class SplitPlan:
    """Indices into the source splits: which images train, validate and test."""

    train: torch.Tensor  # into the training source (train/ or CIFAR's training arrays)
    val: torch.Tensor  # into the training source, or into val/ when `val_from_folder`
    test: torch.Tensor  # into the test source
    val_from_folder: bool


def plan_splits(cfg: DataConfig, train_labels: torch.Tensor, test_labels: torch.Tensor,
                val_labels: torch.Tensor | None = None) -> SplitPlan:  # fmt: skip
    """The validation split (a folder, or `val_split` of the training images, held out before any subset), then the
    class-balanced subsets of each split, all seeded by `split_seed` alone, so that every seed of a sweep and every
    recipe on the same data validates and tests on the same images (paired comparisons need it)."""
    seed = cfg.split_seed
    if val_labels is not None:
        train_idx, val_idx = torch.arange(len(train_labels)), torch.arange(len(val_labels))
        val_pool = val_labels
    else:
        train_idx, val_idx = stratified_split(train_labels, cfg.val_split, seed)
        val_pool = train_labels[val_idx]
    return _subsets(cfg, train_idx, train_labels, val_idx, val_pool, torch.arange(len(test_labels)), test_labels,
                    val_labels is not None)  # fmt: skip


def plan_single_tree(cfg: DataConfig, labels: torch.Tensor) -> SplitPlan:
    """One tree of class folders: `test_split` of every class held out first (seeded, stratified), then `val_split`
    of the rest, then the subsets; every index points into the one tree."""
    seed = cfg.split_seed
    pool, test_idx = stratified_split(labels, cfg.test_split or DEFAULT_TEST_SPLIT, seed + 3)
    kept, held = stratified_split(labels[pool], cfg.val_split, seed)
    train_idx, val_idx = pool[kept], pool[held]
    return _subsets(cfg, train_idx, labels, val_idx, labels[val_idx], test_idx, labels, False)


def _subsets(cfg: DataConfig, train_idx: torch.Tensor, train_labels: torch.Tensor, val_idx: torch.Tensor,
             val_pool: torch.Tensor, test_idx: torch.Tensor, test_labels: torch.Tensor,
             val_from_folder: bool) -> SplitPlan:  # fmt: skip
    """The class-balanced `train_subset`, `val_subset`, `test_subset` of the chosen indices."""
    seed = cfg.split_seed
    train_idx = train_idx[balanced_subset(train_labels[train_idx], cfg.train_subset, seed)]
    val_idx = val_idx[balanced_subset(val_pool, cfg.val_subset, seed + 1)] if len(val_idx) else val_idx
    test_idx = test_idx[balanced_subset(test_labels[test_idx], cfg.test_subset, seed + 2)]
    return SplitPlan(train_idx, val_idx, test_idx, val_from_folder)
