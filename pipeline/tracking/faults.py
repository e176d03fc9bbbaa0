"""A tracking server that goes away: MLflow's client retries with backoff (its own `MLFLOW_HTTP_REQUEST_MAX_RETRIES`,
`MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`: about four minutes by default), each retry said on one line instead of
urllib3's warning; when the retries run out the command stops with one message (exit 1), and the runs it could not
close are remembered in the cache folder and closed as FAILED by the next command that reaches the server, so a
server outage never leaves a run RUNNING. Credentials never appear here: MLflow sends them as a header, not in
the URL."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.paths import default_cache_dir

URLLIB3_LOGGER = "urllib3.connectionpool"  # warns of each retry after a broken connection
URLLIB3_RETRY_LOGGER = "urllib3.util.retry"  # debug line of every retry, the only one for a 5xx answer
RETRY_VARIABLES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
UNCLOSED_ERROR = "the tracking server could not be reached to close this run; closed when the pipeline next reached it"


class _RetryLine(logging.Filter):
    """urllib3's "Retrying (Retry(total=5, …)) after connection broken by 'NewConnectionError(…)'" as one short line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Retrying ("):
            return True
        retry, err = (record.args or (None, None))[:2]
        host = getattr(record, "__urllib3-retry-warning", {}).get("host", "the tracking server")
        left = getattr(retry, "total", None)
        reason = type(err).__name__ if err is not None else "connection broken"
        tries = f", {left} more tries" if isinstance(left, int) else ""
        print(f"tracking server {host} unreachable ({reason}): retrying with backoff{tries}", file=sys.stderr)
        return False


class _StatusRetryLine(logging.Filter):
    """urllib3's debug "Incremented Retry for (url=…)" of a retry after an error status (a server restarting answers
    502 / 503, one whose database restarted 500) as one short line; its other debug lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        if str(record.msg).startswith("Incremented Retry") and len(record.args or ()) == 2:
            url, retry = record.args
            last = retry.history[-1] if getattr(retry, "history", None) else None
            if last is not None and last.status is not None:
                left = getattr(retry, "total", None)
                tries = f", {left} more tries" if isinstance(left, int) else ""
                path = str(url).split("?")[0]
                line = f"tracking server answered {last.status} to {path}: retrying with backoff{tries}"
                print(line, file=sys.stderr)
        return False


_FILTER, _STATUS_FILTER = _RetryLine(), _StatusRetryLine()


def install_retry_line() -> None:
    """Say each of MLflow's retries on one line (idempotent): after a broken connection, and after an error status
    (urllib3 logs those at debug level only, so its retry logger is opened to debug and filtered to that line)."""
    logger = logging.getLogger(URLLIB3_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    retry_logger = logging.getLogger(URLLIB3_RETRY_LOGGER)
    if _STATUS_FILTER not in retry_logger.filters:
        retry_logger.addFilter(_STATUS_FILTER)
        retry_logger.setLevel(logging.DEBUG)


def unreachable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is MLflow's client giving up on a server it could not connect to."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if "Max retries exceeded" in text or "Failed to establish a new connection" in text:
            return True
        if type(err).__name__ in ("ConnectionError", "NewConnectionError", "MaxRetryError"):
            return True
        err = err.__cause__ or err.__context__
    return False


def server_answers(uri: str, timeout: float = 5) -> bool:
    """Whether the tracking server answers its health check now, with no retry (a local store always does): tells a
    server that is away from another connection error that happened to reach the pipeline (a model download)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def away(err: BaseException, uri: str) -> bool:
    """Whether `err` is MLflow giving up on the server at `uri` and that server is still not answering."""
    return unreachable(err) and not server_answers(uri)


def unreachable_message(uri: str) -> str:
    return (
        f"the tracking server at {uri} did not answer through all of MLflow's retries ({RETRY_VARIABLES} set how "
        "long to wait): finished stages are cached; rerun the same command once it is back to resume"
    )


def _ledger(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "unclosed-runs.json"


def _read(path: Path) -> dict[str, list[str]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def _locked(path: Path) -> Iterator[dict[str, list[str]]]:
    """The ledger, read and written back under an exclusive lock (the driver and every Ray worker share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger = _read(path)
        before = json.dumps(ledger)
        yield ledger
        if json.dumps(ledger) != before:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ledger, indent=1))
            tmp.replace(path)


def remember_unclosed(uri: str, run_id: str, cache_dir: Path | None = None) -> None:
    """Note a run the server was not there to close (one file per cache folder, by tracking URI)."""
    with _locked(_ledger(cache_dir)) as ledger:
        runs = ledger.setdefault(uri, [])
        if run_id not in runs:
            runs.append(run_id)


def close_remembered(client, uri: str, error_tag: str, cache_dir: Path | None = None) -> list[str]:
    """Close as FAILED the runs remembered for `uri` that are still RUNNING; returns their ids. Stops at the first
    that cannot be reached (the server is away again: the rest wait for the next command, not for the retries of
    each); keeps any it could not close for another reason."""
    path = _ledger(cache_dir)
    if not path.exists():
        return []
    closed: list[str] = []
    with _locked(path) as ledger:
        remembered, kept = ledger.pop(uri, []), []
        for i, run_id in enumerate(remembered):
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_tag(run_id, error_tag, UNCLOSED_ERROR)
                    client.set_terminated(run_id, "FAILED")
                    closed.append(run_id)
            except Exception as err:
                if unreachable(err):
                    kept += remembered[i:]
                    break
                if "RESOURCE_DOES_NOT_EXIST" not in str(err):  # deleted meanwhile: nothing to close
                    kept.append(run_id)
        if kept:
            ledger[uri] = kept
    if closed:
        print(f"closed {len(closed)} run(s) left RUNNING when the tracking server was unreachable", file=sys.stderr)
    return closed
