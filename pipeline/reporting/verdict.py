"""The sweep's answer in one table: every ordering's final model (validation top-1 with its seed interval, test top-1,
bytes, batch-1 latency in every runtime measured, on the frontier or not) and its paired-test verdict against the
most accurate ordering. The same table opens report.md and is the Description of the sweep's MLflow run, where each
ordering links to its own run and the report is one click away (`links`); `headline` is what the sweep's run logs as
metrics so MLflow's run list and charts show the answer too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from pipeline.analysis.significance import best_or_tied
from pipeline.core.formatting import format_bytes, format_number
from pipeline.reporting.columns import latency_column, report_runtimes, runtime_name
from pipeline.reporting.sweep_tables import SweepReport


@dataclass(frozen=True)
class Links:
    """Where the table's links point (the MLflow UI's pages): `run(run_id)` a run's page, `artifact(run_id, path)`
    one of its artifacts in the artifact viewer; `runs` maps an ordering to its chain runs (one per seed)."""

    run: Callable[[str], str]
    artifact: Callable[[str, str], str]
    runs: dict[str, list[str]]


def measured_runtimes(report: SweepReport) -> list[str]:
    """The runtimes whose batch-1 latency the sweep's stages logged, torch eager first."""
    return [r for r in report_runtimes() if report.points[latency_column(r)].notna().any()]


def final_latencies(report: SweepReport) -> pd.DataFrame:
    """ordering -> mean batch-1 p50 of its final models (over seeds) in every measured runtime."""
    finals = report.points.sort_values("stage_index").groupby(["ordering", "seed"]).tail(1)
    columns = [latency_column(r) for r in measured_runtimes(report)]
    return finals.groupby("ordering")[columns].mean()


def control_orderings(report: SweepReport) -> set[str]:
    """The orderings that are equal-training controls (the baseline trained as long): references, not rivals."""
    return set(report.points.ordering[report.points.control]) if "control" in report.points else set()


def best_ordering(report: SweepReport) -> str:
    """The most accurate compressed ordering on the choice split (the control is a reference, not a candidate)."""
    rivals = report.orderings[~report.orderings.ordering.isin(control_orderings(report))]
    rivals = rivals if len(rivals) else report.orderings
    return str(rivals.sort_values(report.top1, ascending=False).ordering.iloc[0])


def against_best(report: SweepReport, best: str) -> dict[str, str]:
    """ordering -> its paired-test verdict against `best` ('better', 'tied' or 'worse', with Holm's p); empty when
    the sweep has no paired tests."""
    if report.pairs is None:
        return {}
    out = {}
    for row in report.pairs.itertuples():
        if best not in (row.a, row.b):
            continue
        other, verdict = (row.b, row.verdict) if row.a == best else (row.a, _flip(row.verdict))
        out[other] = f"{verdict} (p = {format_number(row.p_holm, '.2g')})"
    return out


def _flip(verdict: str) -> str:
    """`best`'s verdict against another, seen from the other side."""
    return {"better": "worse", "worse": "better"}.get(verdict, verdict)


def verdict_sentence(report: SweepReport, best: str) -> str:
    """What the data supports about the most accurate ordering, in one sentence."""
    split = "validation" if report.split == "val" else "test"
    if report.pairs is None:
        return (f"**`{best}` has the highest {split} top-1**; no paired tests (per-image predictions were not "
                "stored), so whether it is really ahead is not known.")  # fmt: skip
    controls = control_orderings(report)
    rivals = report.pairs[~report.pairs.a.isin(controls) & ~report.pairs.b.isin(controls)]
    if rivals.empty:
        return f"**`{best}`** is the only compressed ordering with paired tests."
    verdict = best_or_tied(rivals)
    if verdict.best is not None:
        return f"**`{verdict.best}` is the most accurate ordering**: significantly better than every other one."
    tied = ", ".join(f"`{n}`" for n in verdict.tied_with)
    return (f"**No ordering is significantly the most accurate**: `{verdict.leader}` has the highest {split} top-1, "
            f"tied with {tied} (paired tests on the same images, Holm-adjusted).")  # fmt: skip


def verdict_markdown(report: SweepReport, links: Links | None = None) -> list[str]:
    """The verdict sentence and table as Markdown lines; with `links`, each ordering links to its MLflow run."""
    best = best_ordering(report)
    verdicts, latencies = against_best(report, best), final_latencies(report)
    runtimes, seeded, controls = measured_runtimes(report), bool(report.sweep.get("seeds")), control_orderings(report)
    split = "val" if report.split == "val" else "test"
    top1_head = f"{split} top-1 %" + (f" (mean of {len(report.sweep['seeds'])} seeds [95 % CI])" if seeded else "")
    head = ["#", "ordering", top1_head]
    head += ["test top-1 %"] if report.split == "val" else []
    head += ["artifact", *(f"{runtime_name(r)} p50 ms" for r in runtimes), "Pareto", "vs best (paired test)"]
    lines = [verdict_sentence(report, best), "", "| " + " | ".join(head) + " |"]
    lines.append("| ---: | --- | " + " | ".join(["---:"] * (len(head) - 4)) + " | :---: | --- |")
    for rank, row in enumerate(report.orderings.to_dict("records"), 1):
        name = row["ordering"]
        cells = [str(rank), _ordering_cell(name, best, controls, links), _top1(row, report.top1, seeded)]
        if report.split == "val":
            cells.append(format_number(row[report.test_top1], ".2f"))
        cells.append(format_bytes(row["artifact_bytes"]))
        cells += [format_number(latencies.loc[name, latency_column(r)], ".2f") for r in runtimes]
        cells += ["yes" if row["pareto"] else "", "**best**" if name == best else verdicts.get(name, "–")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ordering_cell(name: str, best: str, control_names: set[str], links: Links | None) -> str:
    runs = links.runs.get(name, []) if links else []
    text = f"[`{name}`]({links.run(runs[0])})" if links and runs else f"`{name}`"
    if links and len(runs) > 1:
        text += " (seeds: " + ", ".join(f"[{i}]({links.run(r)})" for i, r in enumerate(runs)) + ")"
    if name == best:
        text = f"**{text}** ★"
    return text + (" (equal-training control)" if name in control_names else "")


def _top1(row: dict, top1: str, seeded: bool) -> str:
    if not seeded or row["seeds"] < 2:
        return format_number(row[top1], ".2f")
    low, high = format_number(row["top1_ci_low"], ".2f"), format_number(row["top1_ci_high"], ".2f")
    return f"{row[top1]:.2f} [{low}, {high}]"


def sweep_note(report: SweepReport, links: Links) -> str:
    """The Description of the sweep's MLflow run: the verdict first (the UI folds long descriptions), then how it
    was chosen, the report one click away, and each ordering's run."""
    run_id = str(report.sweep.get("run_id"))
    chosen = (
        "Chosen on the validation split: the ranking, the frontier and the paired tests read its top-1; the "
        "test split's is reported, never chosen on."
        if report.split == "val"
        else "**This sweep measured no "
        "validation split**: it ranks on the test split it reports, so the winner's figures are optimistic."
    )
    lines = [f"### Sweep `{report.sweep_id}`: which ordering wins", "", *verdict_markdown(report, links), ""]
    lines += [
        f"{chosen} Accuracy and frontier in {runtime_name(report.runtime)}; Pareto = the "
        "final model is on the frontier of (top-1, bytes, latency) over every model of the sweep. ★ = the most "
        "accurate ordering; each name opens its run.",
        "",
        f"**Full report**: [report.html]({links.artifact(run_id, 'report/report.html')}) (plots, every pairwise "
        f"test, every model), also [report.md]({links.artifact(run_id, 'report/report.md')}) and the CSV tables.",
    ]
    return "\n".join(lines)


def headline(report: SweepReport) -> dict[str, float]:
    """Metrics for the sweep's run (MLflow's run list and charts show them with no set-up): the best ordering's
    final figures under `best.`, and how many orderings finished and are on the frontier."""
    best = report.orderings[report.orderings.ordering == best_ordering(report)].iloc[0]
    latencies = final_latencies(report).loc[best.ordering]
    out = {"best.val_top1" if report.split == "val" else "best.top1": float(best[report.top1])}
    if report.split == "val":
        out["best.top1"] = float(best[report.test_top1])
    out["best.artifact_bytes"] = float(best["artifact_bytes"])
    out |= {f"best.{column}": float(value) for column, value in latencies.items() if value == value}
    out["orderings_on_frontier"] = float(report.orderings["pareto"].sum())
    return out
