"""Library warnings that say nothing a user can act on, kept off the console while the import that logs them runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

# torch.utils.cpp_extension, imported by torch.utils.benchmark: "No CUDA runtime is found" on every CPU machine.
# torch.utils._pytree, while torchao registers its types: an enum that no longer needs a registration.
IMPORT_NOISE = ("torch.utils.cpp_extension", "torch.utils._pytree")


@contextmanager
def quiet_loggers(names: tuple[str, ...] = IMPORT_NOISE) -> Iterator[None]:
    """Within the block, the named loggers pass errors only; their levels come back after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
