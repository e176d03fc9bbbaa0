"""The command line's exit codes and the one wrapper that maps the pipeline's errors to them (every command module
uses it): 0 success, 1 a stage (or a sweep's ordering) failed or the
tracking server / study database stayed unreachable, 2 the request cannot run as asked, 130 interrupted."""

from __future__ import annotations

import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def guarded(action, invalid: tuple[type[Exception], ...] = ()):
    """Run `action()`, mapping the pipeline's errors to exit codes and one-line messages; `invalid`: the command's own
    errors that mean a request that cannot run as asked (exit 2, like a missing model source or data)."""
    from pipeline.core.data import DataNotFoundError
    from pipeline.core.models import ModelSourceError

    try:
        return action()
    except (ModelSourceError, DataNotFoundError, *invalid) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are cached; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a stage failed: show where, the MLflow runs are marked FAILED
        if server_away(err):  # nothing to debug in a traceback: say what happened and how to go on
            print(f"error: {server_away(err)}", file=sys.stderr)
            return EXIT_FAILED
        traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED


def server_away(err: BaseException) -> str | None:
    """The message for a tracking server or study database that stayed unreachable through every retry, else None."""
    from pipeline.search.storage import StorageUnreachable
    from pipeline.tracking import faults, tracking_uri

    if isinstance(err, StorageUnreachable):
        return str(err)
    return faults.unreachable_message(tracking_uri()) if faults.away(err, tracking_uri()) else None
