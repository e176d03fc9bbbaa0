"""Multi-process training under `torchrun`: every rank trains each stage through the shared loop wrapped in
DistributedDataParallel; only rank 0 evaluates, writes the cache and logs to MLflow.

Every rank draws the same order of global batches (same seed) and its loader reads and augments only its own
slice of each (`pipeline.core.data`), so a step averages the gradients of the whole batch, as one process would.
Outside `torchrun` (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
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
def process_group(timeout_minutes: float = 60.0) -> Iterator[None]:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1): NCCL on GPUs, else gloo; left on exit.

    `timeout_minutes` bounds every collective, the barrier the other ranks wait at while rank 0 evaluates, exports
    and measures a stage included: it must outlast that (torch's default, 10 minutes with NCCL, does not for a
    224-px model evaluated on a large validation split)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
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


def sync_batchnorm_(model: torch.nn.Module) -> Callable[[], None] | None:
    """Under several ranks, swap `model`'s BatchNorm layers for synchronised ones (timm's converter, which keeps
    timm's BatchNormAct); returns a function that puts the original layers back, or None with one rank.

    The synchronised layers share the originals' parameters and statistics tensors, so what they learn is in the
    originals when they are put back; the cached model never holds SyncBatchNorm, which only runs under a process
    group (and, in torch, only on GPUs)."""
    if world()[1] <= 1:
        return None
    from timm.layers import convert_sync_batchnorm

    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    if not originals:
        return None
    swap_norms_(model, {name: convert_sync_batchnorm(norm) for name, norm in originals.items()})
    return lambda: swap_norms_(model, originals)


def swap_norms_(model: torch.nn.Module, norms: dict[str, torch.nn.Module]) -> None:
    """Put `norms` (by qualified name) into `model` in place of the modules there."""
    for name, norm in norms.items():
        model.set_submodule(name, norm)
