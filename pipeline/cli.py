"""Command line: `python -m pipeline run|sweep|search|sensitivity RECIPE [key=value ...]`, `report [SWEEP|SEARCH]`,
`export SOURCE`, `ui`, `server`, `validate`, `stages` (report, ui and server in cli_report, cli_ui and cli_server).

Exit codes: 0 success, 1 a stage (or a sweep's ordering) failed, 2 the recipe (or the command line) is
invalid, 130 interrupted (rerun the same command to resume from the cache).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.cli_exits import EXIT_FAILED, EXIT_INVALID, EXIT_OK, guarded


def _parser() -> argparse.ArgumentParser:
    import stages  # noqa: F401  (stages, and plug-in runtimes listed in PIPELINE_PLUGINS, register themselves)
    from pipeline import cli_report, cli_sensitivity, cli_server, cli_ui

    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        ("run", "run a recipe's chain end to end"),
        ("sweep", "run every ordering of a recipe's stages (its `orderings:`, else all), then write the report"),
        ("search", "search orderings and stage settings (the recipe's `search:`), register the best, report"),
        ("validate", "validate a recipe, run nothing"),
    )
    for name, help_text in commands:
        _add_recipe_command(sub, name, help_text)
    cli_report.add_command(sub)
    _add_export_command(sub)
    cli_sensitivity.add_command(sub)
    cli_ui.add_command(sub)
    cli_server.add_command(sub)
    sub.add_parser("stages", help="list the registered stages and their config fields")
    return parser


def _add_recipe_command(sub, name: str, help_text: str) -> None:
    """`run`, `sweep`, `search` or `validate`: a recipe, its overrides, and the command's options."""
    cmd = sub.add_parser(name, help=help_text)
    cmd.add_argument("recipe", help="a name in recipes/ (e.g. baseline) or a path to a YAML file")
    cmd.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. data.train_subset=2000 baseline.epochs=1",
    )
    if name in {"run", "sweep", "search"}:
        cmd.add_argument("--cache-dir", type=Path, default=None, help="stage cache (default .cache/)")
        cmd.add_argument("--quiet", action="store_true", help="no progress bars (nor per-epoch lines off a terminal)")
    if name == "run":
        cmd.add_argument("--no-cache", action="store_true", help="recompute every stage, ignore the cache")
    if name in {"sweep", "search"}:
        _add_executor_options(cmd, name)
    if name == "search":
        cmd.add_argument("--against", default=None, help="a sweep id whose frontier the report compares with")


def _add_executor_options(cmd, name: str) -> None:
    cmd.add_argument(
        "--executor",
        default=None,
        choices=("local", "ray"),
        help="local: one ordering (trial) after another; ray: orderings (search workers) as Ray tasks "
        "(default: the recipe's `executor:`, else local)",
    )
    cmd.add_argument(
        "--address",
        default=None,
        help="ray: the cluster to join (e.g. 10.0.0.5:6379 or auto); default: start a local Ray",
    )
    cmd.add_argument(
        "--cpus-per-ordering", type=float, default=None, help="ray: CPUs each ordering's task asks for (1)"
    )
    cmd.add_argument(
        "--gpus-per-ordering", type=float, default=None, help="ray: GPUs each ordering's task asks for (0)"
    )
    cmd.add_argument("--new", action="store_true", help=f"a new {name} id instead of resuming an identical one")
    cmd.add_argument("--no-report", action="store_true", help="do not write the report afterwards")
    cmd.add_argument("--reports-dir", type=Path, default=None, help="where reports go (default reports/)")


def _add_export_command(sub) -> None:
    from pipeline.deploy import get_runtime, runtime_names

    export = sub.add_parser("export", help="export a model to ONNX / OpenVINO IR outside a run")
    export.add_argument(
        "source",
        help="an artifact file (artifact.pt, or a folder holding one), an MLflow run id (its model/artifact.pt), or "
        "a recipe whose chain has run (its final stage, from the cache)",
    )
    export.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (a recipe source only)")
    export.add_argument(
        "--format",
        default="all",
        choices=(*(get_runtime(r).format for r in runtime_names()), "all"),
        help="file format(s) to write (default: all)",
    )
    export.add_argument("--out", type=Path, required=True, help="folder to write model.onnx / openvino/model.xml into")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (17-23, default 18)")
    export.add_argument("--cache-dir", type=Path, default=None, help="stage cache of a recipe source (default .cache/)")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; returns the process exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after the options too (`run R --cache-dir D key=value`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="[pipeline] %(message)s", stream=sys.stderr)
    # torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME on CPU-only machines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Off a terminal the training loop logs a line per epoch instead of drawing a bar; --quiet drops those too.
    logging.getLogger("pipeline.core.training").setLevel(
        logging.WARNING if getattr(args, "quiet", False) else logging.NOTSET
    )
    if args.command == "stages":
        return _list_stages()
    if args.command in ("report", "ui", "server"):  # commands of their own modules, without a recipe
        from pipeline import cli_report, cli_server, cli_ui

        return {"report": cli_report, "ui": cli_ui, "server": cli_server}[args.command].run(args)
    if args.command == "export":
        return _export(args)
    from pipeline.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "validate":
        print(f"{args.recipe}: valid ({_describe(recipe)})")
        print(f"# the recipe as it runs (`extends` merged, overrides applied):\n{recipe.to_yaml()}", end="")
        return EXIT_OK
    if args.command == "sensitivity":
        return _sensitivity(recipe, args)
    if args.command == "sweep":
        return _sweep(recipe, args)
    if args.command == "search":
        return _search(recipe, args)
    if recipe.is_search:
        print(
            f"error: recipe {recipe.name!r} declares a search; run it with `make search recipe={args.recipe}` or "
            f"`python -m pipeline search {args.recipe}`",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if recipe.is_sweep:
        print(
            f"error: recipe {recipe.name!r} declares a sweep (orderings, include_singles, seeds or control); run it "
            f"with `make sweep recipe={args.recipe}` or `python -m pipeline sweep {args.recipe}`",
            file=sys.stderr,
        )
        return EXIT_INVALID
    return _run(recipe, args)


def _describe(recipe) -> str:
    from pipeline.search.space import search_orderings
    from pipeline.sweep.orderings import sweep_orderings

    if recipe.is_search:
        cfg = recipe.search
        budget = " and ".join(
            x
            for x in (
                f"{cfg.trials} trials" if cfg.trials else "",
                f"{cfg.timeout_minutes:g} min" if cfg.timeout_minutes else "",
            )
            if x
        )
        return (
            f"search of {len(search_orderings(recipe))} orderings x {len(cfg.space)} sampled field(s) "
            f"({', '.join(cfg.space) or 'none'}); objectives {', '.join(f'{m} {d}' for m, d in cfg.objectives.items())}"
            f"; constraints {'; '.join(cfg.constraints) or 'none'}; budget {budget}"
        )
    if not recipe.is_sweep:
        return recipe.ordering
    orderings, skipped = sweep_orderings(recipe)
    text = f"sweep of {len(orderings)} orderings: " + ", ".join(">".join(o) for o in orderings)
    if recipe.seeds is not None:
        text += f"; each with seeds {', '.join(map(str, recipe.seed_list()))} (seed_scope {recipe.seed_scope})"
    if recipe.control is not False:
        text += "; plus the equal-training control"
    return text + (f"; skipped {len(skipped)}: " + "; ".join(r for _, r in skipped) if skipped else "")


def _sensitivity(recipe, args) -> int:
    from pipeline import cli_sensitivity
    from pipeline.sensitivity.config import SensitivityError

    return guarded(lambda: cli_sensitivity.run(recipe, args), invalid=(SensitivityError,))


def _sweep(recipe, args) -> int:
    from pipeline.reporting.summaries import sweep_table
    from pipeline.sweep.sweep import run_sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            "error: a sweep does not run under torchrun; run one chain with `torchrun … -m pipeline run`, "
            "or spread orderings with --executor ray",
            file=sys.stderr,
        )
        return EXIT_INVALID

    executor = _executor(recipe, args)
    if executor is None:
        return EXIT_INVALID

    def sweep() -> int:
        progress = not args.quiet and sys.stderr.isatty()
        summary = run_sweep(recipe, cache_dir=args.cache_dir, executor=executor, progress=progress, new=args.new)
        print(sweep_table(summary))
        if summary.failed:
            names = ", ".join(r.ordering for r in summary.failed)
            print(f"error: {len(summary.failed)} ordering(s) failed: {names} (errors in MLflow)", file=sys.stderr)
        finished = len(summary.results) - len(summary.failed) + len(summary.already_done)
        if not args.no_report and finished:
            from pipeline import cli_report

            cli_report.report_sweep(summary.plan.sweep_id, args.reports_dir)
        return EXIT_FAILED if summary.failed else EXIT_OK

    return guarded(sweep)


def _executor(recipe, args):
    """The recipe's executor with the command line's overrides; None (after saying why) when it cannot start."""
    from pipeline.run.executors import get_executor

    chosen = recipe.executor.model_copy(
        update={
            k: v
            for k, v in {
                "name": args.executor,
                "address": args.address,
                "cpus": args.cpus_per_ordering,
                "gpus": args.gpus_per_ordering,
            }.items()
            if v is not None
        }
    )
    options = chosen.model_dump(exclude={"name"}) if chosen.name == "ray" else {}
    try:
        executor = get_executor(chosen.name, **options)
    except ValueError as err:
        print(f"error: --executor: {err}", file=sys.stderr)
        return None
    return executor


def _search(recipe, args) -> int:
    from pipeline.search.search import run_search

    if not recipe.is_search:
        print(f"error: recipe {recipe.name!r} has no `search:` block; see README (Search)", file=sys.stderr)
        return EXIT_INVALID
    executor = _executor(recipe, args)
    if executor is None:
        return EXIT_INVALID

    def search() -> int:
        progress = not args.quiet and sys.stderr.isatty()
        summary = run_search(recipe, cache_dir=args.cache_dir, executor=executor, progress=progress, new=args.new)
        totals, best = summary.outcome.totals(), summary.outcome.chosen
        pruned = f", {int(totals['trials_pruned'])} pruned" if totals["trials_pruned"] else ""
        print(f"\nsearch {summary.plan.search_id}: {int(totals['trials_complete'])} trials finished "
              f"({int(totals['trials_early_stopped'])} ended early, {int(totals['trials_feasible'])} feasible)"
              f"{pruned}, Pareto set of {int(totals['pareto_size'])}, {summary.seconds / 60:.1f} min")  # fmt: skip
        if summary.outcome.confirmed is not None:
            print(
                f"confirmed with {summary.plan.config.confirm_seeds} more seed(s): "
                f"{int(totals['confirmed_pareto_size'])} configuration(s) on the frontier of the seed means"
            )
        if best is not None:
            chosen = "best by seed mean" if summary.outcome.confirmed is not None else "best under the constraints"
            print(f"{chosen}: trial {best.number} ({best.chain})"
                  + (f", registered as {summary.registered[0]} version {summary.registered[1]}" if summary.registered
                     else ""))  # fmt: skip
        else:
            print("no trial met every constraint; nothing registered")
        failed_workers = [w for w in summary.workers if w.error]
        if totals["trials_failed"]:
            print(f"error: {int(totals['trials_failed'])} trial(s) failed (errors in MLflow)", file=sys.stderr)
        status = EXIT_OK
        if failed_workers or (totals["trials_failed"] and not totals["trials_complete"]):
            status = EXIT_FAILED
        if not args.no_report and totals["trials_complete"]:
            from pipeline import cli_report

            reported = cli_report.report_search(summary.plan.search_id, args.reports_dir, args.against)
            status = status or reported
        return status

    return guarded(search)


def _export(args) -> int:
    from pipeline import load_artifact
    from pipeline.deploy import ExportError, export_files, get_runtime, runtime_file_bytes, runtime_names
    from pipeline.run.find_artifact import SourceError, resolve_artifact

    if not 17 <= args.opset <= 23:
        print(f"error: --opset: must be 17..23, got {args.opset}", file=sys.stderr)
        return EXIT_INVALID
    runtimes = [r for r in runtime_names() if args.format in ("all", get_runtime(r).format)]

    def export() -> int:
        try:
            artifact = resolve_artifact(args.source, args.overrides, cache_dir=args.cache_dir)
        except SourceError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
        model = load_artifact(artifact)
        try:
            files = export_files(model, tuple(model.pretrained_cfg["input_size"]), args.out, runtimes, opset=args.opset)
        except ExportError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_FAILED
        print(f"exported {artifact} ({model.pretrained_cfg.get('architecture', '?')}):")
        for runtime, file in files.items():
            print(f"  {runtime}: {file} ({runtime_file_bytes(file):,} bytes)")
        return EXIT_OK

    return guarded(export)


def _run(recipe, args) -> int:
    from pipeline.core import distributed
    from pipeline.reporting.summaries import summary_table
    from pipeline.run.runner import Runner

    def run() -> int:
        progress = not args.quiet and sys.stderr.isatty()
        # under torchrun: one process per rank, rank 0 reports
        with distributed.process_group(recipe.distributed.timeout_minutes):
            runner = Runner(recipe, cache_dir=args.cache_dir, progress=progress, use_cache=not args.no_cache)
            summary = runner.run()
            if distributed.is_main():
                print(summary_table(summary))
        return EXIT_OK

    return guarded(run)


def _list_stages() -> int:
    from stages import available_stages, get_stage

    for name in available_stages():
        entry = get_stage(name)
        print(f"{name}: {entry.summary}")
        for field, info in entry.config.model_fields.items():
            default = "required" if info.is_required() else f"default {info.default!r}"
            print(f"  {field} ({default}): {info.description or ''}")
    return EXIT_OK
