"""Shared benchmark plumbing: run recipe variants through the real runner (cache and MLflow included),
then re-measure batch-1 latency of their artifacts side by side, interleaved, so ratios are not skewed
by whatever else the machine was doing when each stage ran."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import load_artifact  # noqa: E402
from pipeline.core.metrics import latency_side_by_side  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.run.runner import Runner  # noqa: E402


@dataclass
class Row:
    label: str
    metrics: dict[str, float]
    artifact: Path
    latency_p50_side_by_side: float = float("nan")


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """Benchmark options (plus those `extra(parser)` adds); also sets up progress logging like the CLI."""
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every variant")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (median reported)")
    parser.add_argument("--runs", type=int, default=100, help="batch-1 forward passes per round")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def run_variant(recipe: str, label: str, overrides: list[str]) -> tuple[Row, Row]:
    """Run one recipe variant; returns (baseline row, final-stage row)."""
    summary = Runner(load_recipe(recipe, overrides), progress=sys.stderr.isatty()).run()
    first, last = summary.results[0], summary.results[-1]
    return Row("baseline", first.metrics, first.artifact_path), Row(label, last.metrics, last.artifact_path)


def run_all(variants: dict[str, tuple[str, list[str]]], args: argparse.Namespace, command: str) -> list[Row]:
    """Run each `label: (recipe, overrides)`, then measure all artifacts side by side and print the table."""
    rows: list[Row] = []
    for label, (recipe, overrides) in variants.items():
        baseline, row = run_variant(recipe, label, [*overrides, *args.set])
        rows = rows or [baseline]
        rows.append(row)
    side_by_side_latency_(rows, threads=1, rounds=args.rounds, runs=args.runs)
    report(rows, args, f"{command} {' '.join(args.set)}".strip())
    return rows


def side_by_side_latency_(rows: list[Row], threads: int, rounds: int, runs: int) -> None:
    """Median over `rounds` of each artifact's p50, the artifacts measured in turn within each round."""
    models = [load_artifact(r.artifact) for r in rows]
    sizes = [tuple(m.pretrained_cfg["input_size"]) for m in models]
    medians = latency_side_by_side(models, sizes, threads=threads, rounds=rounds, runs=runs)
    for row, value in zip(rows, medians, strict=True):
        row.latency_p50_side_by_side = value


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def markdown_table(rows: list[Row]) -> str:
    base = rows[0]
    lines = [
        "| variant | top1 % | Δ top1 (pts) | params | artifact bytes | size ratio | p50 ms (batch 1) | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        m = r.metrics
        lines.append(
            f"| {r.label} | {m['top1']:.2f} | {m['top1'] - base.metrics['top1']:+.2f} | {m['params']:,.0f} | "
            f"{m['artifact_bytes']:,.0f} | {m['artifact_bytes'] / base.metrics['artifact_bytes']:.3f} | "
            f"{r.latency_p50_side_by_side:.2f} | "
            f"{base.latency_p50_side_by_side / r.latency_p50_side_by_side:.2f}x |"
        )
    return "\n".join(lines)


def report(rows: list[Row], args: argparse.Namespace, command: str) -> None:
    print(
        f"\n{command}\nmachine: {machine()}, latency: 1 thread, median of {args.rounds} interleaved rounds "
        f"x {args.runs} runs\n"
    )
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                [{"label": r.label, **r.metrics, "latency_p50_side_by_side": r.latency_p50_side_by_side} for r in rows],
                indent=2,
            )
        )
