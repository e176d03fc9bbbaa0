"""Multi-process training under `torchrun`: every rank trains each stage through the shared loop wrapped in
DistributedDataParallel; only rank 0 evaluates, writes the cache and logs to MLflow.

Every rank draws the same order of global batches (same seed) and its loader reads and augments only its own
slice of each (`pipeline.data`), so a step averages the gradients of the whole batch, as one process would.
Outside `torchrun` (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that evaluates, caches and logs."""
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1): NCCL on GPUs, else gloo; left on exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel when there are several ranks (syncs parameters from rank 0), else itself."""
    if world()[1] <= 1:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
