"""Optuna's RDB storage that survives its database restarting: every storage call that fails because the
connection was lost (PostgreSQL restarted, the network dropped, SQLite locked for too long) is retried with
exponential backoff, each retry said on one line, for up to `PIPELINE_STORAGE_TIMEOUT_S` seconds (default 300);
then `StorageUnreachable` stops the command (exit 1; a rerun resumes the study). Connections are checked before
use (`pool_pre_ping`), so a pool holding connections from before a restart reconnects instead of failing.

A retried write is safe when the connection was lost before its commit (the database rolls the transaction back).
When the commit went through and only its acknowledgement was lost, the retry finds the write done: a retried
state update of a trial that is already finished is taken as done; a retried `create_new_trial` would add a second
trial (rare: the window is the acknowledgement of one commit). Refused logins (a wrong password) are not retried."""

from __future__ import annotations

import functools
import os
import sys
import time

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage

DEFAULT_TIMEOUT_S = 300.0
MAX_DELAY_S = 30.0


class StorageUnreachable(RuntimeError):
    """The search's study database did not come back within the retry timeout."""


def timeout_s() -> float:
    return float(os.environ.get("PIPELINE_STORAGE_TIMEOUT_S") or DEFAULT_TIMEOUT_S)


def connection_lost(err: BaseException) -> bool:
    """Whether `err` (or its cause) is a lost or refused database connection, not a bad request."""
    from sqlalchemy import exc

    seen: set[int] = set()
    while err is not None and id(err) not in seen and not isinstance(err, StorageUnreachable):  # retried already
        seen.add(id(err))
        if "authentication failed" in str(err) or "no password supplied" in str(err):
            return False  # refused, not lost: retrying would not change the answer
        if isinstance(err, exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, exc.OperationalError | exc.InterfaceError | exc.DisconnectionError):
            return True
        if type(err).__module__.startswith("psycopg") and type(err).__name__ in ("OperationalError", "InterfaceError"):
            return True
        err = err.__cause__ or err.__context__
    return False


def with_retries(call, what: str):
    """`call()`, retried while the database is unreachable, for up to `timeout_s()`."""
    deadline, delay, attempt = time.monotonic() + timeout_s(), 1.0, 0
    while True:
        try:
            return call()
        except UpdateFinishedTrialError:
            if attempt == 0:
                raise
            return None  # the attempt whose connection was lost had committed it
        except Exception as err:  # Optuna wraps SQLAlchemy's errors in StorageInternalError: read the cause
            if not connection_lost(err):
                raise
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise StorageUnreachable(
                    f"the search's study database did not answer for {timeout_s():.0f} s ({what}: "
                    f"{type(err).__name__}); PIPELINE_STORAGE_TIMEOUT_S sets how long to wait; finished trials are "
                    "in the study and stages in the cache: rerun the same command to resume"
                ) from err
            reason = (str(err.__cause__ or err).splitlines() or [""])[0][:120]
            print(f"study database unreachable ({reason}): retry {attempt} in {delay:.0f} s", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


def _retrying(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return with_retries(lambda: method(self, *args, **kwargs), method.__name__)

    return call


class RetryingRDBStorage(RDBStorage):
    """RDBStorage whose every public storage method retries on a lost connection (see the module's docstring)."""

    def __init__(self, url: str, **kwargs) -> None:
        engine = dict(kwargs.pop("engine_kwargs", None) or {})
        if url.startswith("postgresql"):  # an attempt that hangs on a dead connection must not outlive the timeout
            engine.setdefault("pool_pre_ping", True)
            engine.setdefault("connect_args", {"connect_timeout": 10, "keepalives_idle": 30})
        with_retries(lambda: RDBStorage.__init__(self, url, engine_kwargs=engine, **kwargs), "connect")


# The public storage API, plus the private calls Optuna's own cache layer (`_CachedStorage`, which wraps every
# RDBStorage a study opens) makes on it.
_CACHE_CALLS = {"_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials", "_get_stale_trial_ids"}
for _name in sorted({name for name in dir(BaseStorage) if not name.startswith("_")} | _CACHE_CALLS):
    _method = getattr(RDBStorage, _name)  # an AttributeError here: Optuna renamed a call its cache layer makes
    if callable(_method):
        setattr(RetryingRDBStorage, _name, _retrying(_method))
