"""Content-addressed store of completed stage outputs.

A stage's key hashes its input's key, its name and its resolved config, so a rerun (or another
recipe or ordering with the same prefix) finds finished work instead of redoing it. Entries are
written to a temporary folder and renamed into place: a crash never leaves a half-written entry.
Metrics are stored per evaluation setting, so changing how latency is measured re-measures the
cached model instead of retraining it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pipeline.core.artifacts import ARTIFACT_FILE
from pipeline.core.models import ModelState

STATE_FILE, RECORD_FILE, METRICS_DIR = "state.pt", "record.json", "metrics"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class CacheEntry:
    """One completed stage output on disk."""

    key: str
    path: Path

    @property
    def artifact_path(self) -> Path:
        return self.path / ARTIFACT_FILE

    @cached_property
    def record(self) -> dict[str, Any]:
        """The entry's record.json (read once: entries are immutable once written)."""
        return json.loads((self.path / RECORD_FILE).read_text())

    def load_state(self) -> ModelState:
        """The stage's output model state (whole modules: structured pruning changes the architecture)."""
        # Pickled, so it is read with weights_only=False: it is this tool's own output, never a download.
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as err:
            raise RuntimeError(f"cache entry {self.path} cannot be read ({err}); rerun with --no-cache") from err

    def metrics(self, eval_key: str) -> dict[str, float] | None:
        path = self.path / METRICS_DIR / f"{eval_key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def predictions_path(self, eval_key: str) -> Path:
        """Per-image predictions (see `pipeline.core.metrics.save_predictions`) of the evaluation `eval_key`."""
        return self.path / METRICS_DIR / f"{eval_key}.predictions.npz"

    def put_predictions(self, eval_key: str, by_runtime) -> None:
        """Write the per-image predictions atomically (before the metrics: their presence marks the evaluation done)."""
        from pipeline.core.metrics import save_predictions

        path = self.predictions_path(eval_key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
        save_predictions(tmp, by_runtime)
        os.replace(tmp, path)

    def put_metrics(self, eval_key: str, metrics: dict[str, float]) -> None:
        (self.path / METRICS_DIR).mkdir(exist_ok=True)
        write_json_atomic(self.path / METRICS_DIR / f"{eval_key}.json", metrics)


log = logging.getLogger("pipeline")


class StageCache:
    """Stage outputs under `root/<key[:2]>/<key>/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold an exclusive lock on `key` across processes (flock on `root/locks/<key>.lock`), so that of two
        workers reaching the same stage one trains it and the other waits, then finds the entry. The lock is
        released when the holder exits, even by a crash. Needs a filesystem with working flock (local disks,
        most cluster filesystems; not every NFS setup)."""
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("stage %s is being computed by another worker; waiting for it", key[:12])
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def work_dir(self, key: str) -> Path:
        """Where the stage `key` keeps its checkpoints while it trains (`pipeline.core.checkpoints`); removed once the
        entry is written."""
        return self.root / "work" / key

    def get(self, key: str) -> CacheEntry | None:
        path = self._path(key)
        return CacheEntry(key, path) if (path / RECORD_FILE).is_file() else None

    def put(self, key: str, state: ModelState, record: dict[str, Any], write_artifact) -> CacheEntry:
        """Store `state` under `key` atomically; `write_artifact(state, path)` writes the deployable file."""
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            torch.save(state, tmp / STATE_FILE)
            write_artifact(state, tmp / ARTIFACT_FILE)
            write_json_atomic(tmp / RECORD_FILE, {**record, "key": key, "status": "SUCCEEDED"})
            if final.exists():  # a forced rerun (--no-cache) replaces the old entry, metrics included
                old = final.parent / f".old-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return CacheEntry(key, final)
