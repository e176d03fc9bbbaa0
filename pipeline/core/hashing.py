"""Stable digests of configs and files: what cache keys and decode-cache names are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def update_with_file(h, path: Path) -> None:
    """Feed a file's bytes into the hash `h`, a block at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    update_with_file(h, path)
    return h.hexdigest()
