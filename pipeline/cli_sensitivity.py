"""`python -m pipeline sensitivity RECIPE`: per-layer sensitivity of the recipe's baseline (or of the model entering
one of its stages) to each technique setting, scored on the validation split; report in reports/sensitivity-<name>/."""

from __future__ import annotations

import sys
from pathlib import Path


def add_command(sub) -> None:
    cmd = sub.add_parser("sensitivity", help="per-layer sensitivity to pruning, int8 and INQ (validation top-1 drop)")
    cmd.add_argument("recipe", help="a name in recipes/ (e.g. baseline) or a path to a YAML file")
    cmd.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.val_split=0.1")
    cmd.add_argument("--stage", default=None, help="analyse the model entering this stage (default: the baseline)")
    cmd.add_argument("--layers", nargs="+", default=[], metavar="GLOB", help="only these layers (e.g. 'layer4.*')")
    cmd.add_argument("--techniques", nargs="+", default=None, metavar="NAME", help="default: prune int8 inq")
    cmd.add_argument("--prune-ratios", nargs="+", type=float, default=None, metavar="R", help="default 0.25 0.5 0.75")
    cmd.add_argument("--inq-bits", nargs="+", type=int, default=None, metavar="B", help="default 3 4 5")
    cmd.add_argument("--importance", default=None, help="pruning criterion (the prune stage's; default group_norm)")
    cmd.add_argument("--images", type=int, default=None, help="score on this many validation images (default all)")
    cmd.add_argument("--calibration-batches", type=int, default=None, help="int8 calibration batches (default 4)")
    cmd.add_argument("--cache-dir", type=Path, default=None, help="stage cache (default .cache/)")
    cmd.add_argument("--reports-dir", type=Path, default=None, help="where reports go (default reports/)")
    cmd.add_argument("--quiet", action="store_true", help="a progress line every tenth of the grid only")
    cmd.add_argument("--no-latency", action="store_true", help="skip the layers' ONNX Runtime latency shares")


def options(args):
    """The analysis config from the command line (only the options given; the rest keep their defaults)."""
    from pydantic import ValidationError

    from pipeline.sensitivity.config import SensitivityConfig, SensitivityError

    given = {
        "techniques": args.techniques, "prune_ratios": args.prune_ratios, "inq_bits": args.inq_bits,
        "importance": args.importance, "images": args.images, "calibration_batches": args.calibration_batches,
        "layers": args.layers or None, "latency": False if args.no_latency else None,
    }  # fmt: skip
    try:
        return SensitivityConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise SensitivityError(f"{option}: {first['msg']}") from None


def run(recipe, args) -> int:
    """Analyse, print the ranked table, write the report files and log them on an MLflow run; returns the exit code."""
    from pipeline.core.paths import PROJECT_ROOT
    from pipeline.reporting.sensitivity import log_to_mlflow, ranked_table, write_report
    from pipeline.run.runner import default_cache_dir
    from pipeline.sensitivity.analysis import analyse
    from pipeline.sensitivity.probes import grid
    from pipeline.sensitivity.source import describe, model_and_data
    from pipeline.tracking import Tracker

    config = options(args)  # bad options are refused before anything runs
    grid(config)
    tracker = Tracker()
    state, data, key = model_and_data(recipe, args.stage, cache_dir=args.cache_dir, tracker=tracker,
                                      progress=not args.quiet and sys.stderr.isatty())  # fmt: skip
    result = analyse(state.model, data, config, model_name=describe(recipe, args.stage), model_key=key,
                     cache_dir=args.cache_dir or default_cache_dir(), progress=not args.quiet)  # fmt: skip
    name = f"sensitivity-{recipe.name}" + (f"-{args.stage}" if args.stage else "")
    out_dir = (args.reports_dir or PROJECT_ROOT / "reports") / name
    write_report(result, out_dir)
    run_id = log_to_mlflow(result, out_dir, tracker, recipe.name)
    print(ranked_table(result))
    print(f"\n{len(result.cells)} evaluations ({result.evaluated} run now, the rest cached) in "
          f"{result.seconds / 60:.1f} min; report in {out_dir} (CSV, PNG, HTML), MLflow run {run_id}")  # fmt: skip
    return 0
