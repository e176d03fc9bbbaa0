"""Executors: how a sweep's orderings run. `local` runs them one after another in this process; `ray` submits
each ordering as a Ray task (a local Ray instance, or a cluster given its address).

Orderings may run at the same time: the stage cache's per-key lock makes the first worker to reach a
shared prefix train it while the others wait and then reuse it, so prefixes still train once.
An executor yields each job's result as it finishes; a job whose worker died yields `job.failed(reason)`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

log = logging.getLogger("pipeline")
# Environment variables that hold secrets: never copied into a Ray job's runtime_env.
SECRET_VARIABLES = frozenset(
    (
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    )
)


def _carries_password(value: str) -> bool:
    """A URL with a password in it (`scheme://user:password@host`): kept out of Ray's runtime_env like the rest."""
    head, sep, _ = value.partition("@")
    return bool(sep) and "://" in head and ":" in head.split("://", 1)[1]


class Job(Protocol):
    def failed(self, error: str): ...


J = TypeVar("J", bound=Job)
R = TypeVar("R")


class Executor(Protocol):
    """Runs jobs and yields their results as they finish (in any order)."""

    name: str

    def map(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]: ...


class LocalExecutor:
    """One job after another in this process; a shared prefix is trained by the first ordering that needs it."""

    name = "local"

    def map(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        for job in jobs:
            yield fn(job)


class RayExecutor:
    """Each job a Ray task with its resource request, on a local Ray instance or the cluster at `address`.

    A task whose worker dies is retried `max_retries` times, then reported failed; the other jobs go on.
    Every worker must see the same stage cache path (a shared filesystem on a multi-node cluster) and
    the same MLflow tracking URI (a tracking server, see `make server`).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus: float = 1.0, gpus: float = 0.0, max_retries: int = 1) -> None:
        self.address, self.cpus, self.gpus, self.max_retries = address, cpus, gpus, max_retries

    def map(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        import ray  # optional extra: pip install -e '.[ray]'

        if not ray.is_initialized():
            # Workers inherit the tracking URI, the study storage and the cache location from this process's
            # environment; never a password (Ray keeps a job's runtime_env in its logs and control store): a local
            # instance's workers inherit them from this process anyway, a cluster's nodes read their own credentials
            # files (~/.mlflow/credentials, ~/.pgpass).
            env = {
                k: v
                for k, v in os.environ.items()
                if (k.startswith(("MLFLOW_", "PIPELINE_")) or k in ("PYTHONPATH", "OPTUNA_STORAGE"))
                and k not in SECRET_VARIABLES
                and not _carries_password(v)
            }
            ray.init(
                address=self.address,
                include_dashboard=False,
                runtime_env={"env_vars": env},
                log_to_driver=True,
                configure_logging=False,
            )
        # Ray sets OMP_NUM_THREADS to the task's CPUs; the runner sizes torch's thread pool from it.
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries)(_logging_to_stderr(fn))
        pending = {task.remote(job): job for job in jobs}
        log.info("ray: %d jobs submitted (%.1f CPU, %.1f GPU each)", len(pending), self.cpus, self.gpus)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready)
            try:
                yield ray.get(ready)
            except ray.exceptions.RayError as err:  # the worker died (or the task raised past fn's own handling)
                log.error("ray: a job failed: %s", str(err).splitlines()[0])
                yield job.failed(f"{type(err).__name__}: {str(err).splitlines()[0]}")


def _logging_to_stderr(fn: Callable[[J], R]) -> Callable[[J], R]:
    """`fn` with the `pipeline` logger's INFO lines (stage starts, one line per training epoch) going to stderr,
    which Ray forwards to the driver: a Ray worker configures no logging, so they would be dropped."""

    @functools.wraps(fn)
    def run(job: J) -> R:
        logger = logging.getLogger("pipeline")
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[pipeline] %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        return fn(job)

    return run


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "ray": RayExecutor}


def get_executor(name: str, **options) -> Executor:
    """A new executor by name (`local`, `ray`); `options` go to its constructor (e.g. address for ray)."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(sorted(EXECUTORS))}")
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("executor 'ray' needs Ray: pip install -e '.[ray]' (make test installs it)") from None
    return EXECUTORS[name](**options)
