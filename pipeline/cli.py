"""Command line: `python -m pipeline run RECIPE [key=value ...]`, `validate`, `stages`.

Exit codes: 0 success, 1 a stage failed, 2 the recipe (or the command line) is invalid,
130 interrupted (rerun the same command to resume from the cache).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run a recipe end to end"), ("validate", "validate a recipe, run nothing")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("recipe", help="a name in recipes/ (e.g. baseline) or a path to a YAML file")
        cmd.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. data.train_subset=2000 baseline.epochs=1",
        )
        if name == "run":
            cmd.add_argument("--cache-dir", type=Path, default=None, help="stage cache (default .cache/)")
            cmd.add_argument("--no-cache", action="store_true", help="recompute every stage, ignore the cache")
            cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("stages", help="list the registered stages and their config fields")
    for name in ("sweep", "report"):
        cmd = sub.add_parser(name, help=f"{name} (not yet supported)")
        cmd.add_argument("args", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[pipeline] %(message)s", stream=sys.stderr)
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU-only machines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.command in {"sweep", "report"}:
        print(f"error: `{args.command}` is not yet supported (planned in issue #7)", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "stages":
        return _list_stages()
    from pipeline.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "validate":
        print(f"{args.recipe}: valid ({recipe.ordering})")
        return EXIT_OK
    return _run(recipe, args)


def _run(recipe, args) -> int:
    from pipeline.data import DataNotFoundError
    from pipeline.models import ModelSourceError
    from pipeline.report import summary_table
    from pipeline.runner import Runner

    try:
        summary = Runner(
            recipe,
            cache_dir=args.cache_dir,
            progress=not args.quiet and sys.stderr.isatty(),
            use_cache=not args.no_cache,
        ).run()
    except (ModelSourceError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are cached; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a stage failed: show where, the MLflow runs are marked FAILED
        traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_table(summary))
    return EXIT_OK


def _list_stages() -> int:
    from stages import available_stages, get_stage
    from stages.base import PLANNED_STAGES

    for name in available_stages():
        entry = get_stage(name)
        print(f"{name}: {entry.summary}")
        for field, info in entry.config.model_fields.items():
            default = "required" if info.is_required() else f"default {info.default!r}"
            print(f"  {field} ({default}): {info.description or ''}")
    for name, issue in PLANNED_STAGES.items():
        print(f"{name}: not yet supported (issue #{issue})")
    return EXIT_OK
