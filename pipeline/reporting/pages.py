"""The sweep report's documents: report.md (facts, the orderings table, the frontiers, the plots), report.html
(the same, with interactive plots; self-contained, plotly.js inlined) and the CSV tables beside them."""

from __future__ import annotations

import html
import time
from itertools import combinations
from pathlib import Path

from pipeline.pareto import pair_column
from pipeline.reporting.columns import REPORT_RUNTIMES, latency_column, runtime_name, top1_column
from pipeline.reporting.formatting import format_bytes, format_number
from pipeline.reporting.plots import plot_png, plotly_figure, plots
from pipeline.reporting.sweep_tables import SweepReport


def write_report(report: SweepReport, out_dir: Path) -> list[Path]:
    """Write report.md, orderings.csv, models.csv, one PNG per plot and report.html into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "orderings.csv", out_dir / "models.csv"]
    report.orderings.to_csv(paths[0], index=False, float_format="%.6g")
    report.models.to_csv(paths[1], float_format="%.6g")
    for name, (x, y) in plots(report.runtime).items():
        paths.append(plot_png(report, x, y, out_dir / f"{name}.png"))
    paths.append(out_dir / "report.md")
    paths[-1].write_text(markdown(report))
    paths.append(out_dir / "report.html")
    paths[-1].write_text(html_page(report))
    return paths


def markdown(report: SweepReport) -> str:
    """The report as Markdown: how the sweep ran, the orderings table, the frontiers, the plots."""
    s, top1 = report.sweep, top1_column(report.runtime)
    lines = [f"# Sweep `{report.sweep_id}`", ""]
    lines += [f"- {line}" for line in _facts(report)]
    lines += ["", "## Orderings, best first", "", _orderings_markdown(report), ""]
    lines += [
        f"Pareto = the ordering's final model is on the 3-D frontier ({', '.join(report.objectives)}) "
        "of every model in the sweep, intermediate stages and baseline included.",
        "",
    ]
    lines += [f"## Pareto frontiers ({runtime_name(report.runtime)})", ""]
    for column, title in _frontier_titles(report).items():
        on = report.models[report.models[column]].sort_values(top1, ascending=False)
        lines.append(
            f"- **{title}**: " + ", ".join(f"`{p}` ({t:.2f} %)" for p, t in zip(on.path, on[top1], strict=True))
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name}.png)" for name in plots(report.runtime)]
    lines += ["", f"Interactive version: [report.html](report.html). Sweep run in MLflow: `{s.get('run_id')}`.", ""]
    return "\n".join(lines)


def _facts(report: SweepReport) -> list[str]:
    """How the sweep ran: recipe, outcome, budget, baseline, runtime, stage runs, how latency was measured."""
    s, base = report.sweep, report.points[report.points.stage_index == 0].iloc[0]
    top1, latency = top1_column(report.runtime), latency_column(report.runtime)
    facts = [
        f"recipe `{s.get('recipe')}`, model `{s.get('model', '?')}`, dataset `{s.get('dataset', '?')}`, "
        f"executor `{s.get('executor', '?')}`; report written {time.strftime('%Y-%m-%d %H:%M')}",
        f"{len(report.orderings)} orderings finished; failed: {', '.join(s.get('failed_orderings') or []) or 'none'}"
        f"; skipped: {s.get('skipped', 'none')}",
        f"budget: {s.get('budget', 'none')}",
        f"baseline: {base[top1]:.2f} % top-1, {format_bytes(base.artifact_bytes)}, {base[latency]:.2f} ms p50 "
        f"in {runtime_name(report.runtime)}",
        f"accuracy and latency: {runtime_name(report.runtime)} (`make report runtime=…` picks another of "
        f"{', '.join(r for r in REPORT_RUNTIMES if r == 'torch' or report.points[latency_column(r)].notna().any())})",
    ]
    if "stage_runs_executed" in s:
        facts.append(
            f"stage runs: {s['stage_runs_executed']:.0f} executed, {s['stage_runs_reused']:.0f} reused from the "
            f"cache; sweep wall time {s.get('sweep_seconds', float('nan')) / 60:.1f} min"
        )
    if s.get("latency_source") == "side by side":
        facts.append(
            f"latency: batch-1 p50 on 1 thread, re-measured at report time side by side: {s.get('latency_how')}"
        )
    else:
        facts.append("latency: batch-1 p50 of each stage's model, measured right after the stage ran")
    if s.get("cpu_capability"):
        facts.append(f"CPU instruction set (torch): {s['cpu_capability']}")
    return facts


def _orderings_markdown(report: SweepReport) -> str:
    runtime, orderings = report.runtime, report.orderings
    top1, latency = top1_column(runtime), latency_column(runtime)
    eager = runtime != "torch"
    head = f"p50 ms ({runtime_name(runtime)})"
    lines = [
        f"| # | ordering | top1 % | Δ top1 (pts) | artifact | size × | {head} | speed-up |"
        + (" torch eager p50 ms | torch eager speed-up |" if eager else "")
        + " Pareto | stages trained |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" if eager else "")
        + " :---: | ---: |",
    ]
    num = format_number
    for rank, r in enumerate(orderings.to_dict("records"), 1):
        extra = f" {num(r['torch_latency_ms_p50'], '.2f')} | {num(r['torch_speedup'], '.2f')}× |" if eager else ""
        lines.append(
            f"| {rank} | `{r['ordering']}` | {num(r[top1], '.2f')} | {num(r['delta_top1'], '+.2f')} | "
            f"{format_bytes(r['artifact_bytes'])} | {num(r['size_ratio'], '.3f')} | {num(r[latency], '.2f')} | "
            f"{num(r['speedup'], '.2f')}× |{extra} {'yes' if r['pareto'] else ''} | "
            f"{r['stages_trained']}/{r['stages'] + 1} |"
        )
    return "\n".join(lines)


def _frontier_titles(report: SweepReport) -> dict[str, str]:
    objectives = report.objectives
    titles = {"pareto": "3-D (" + ", ".join(objectives) + ")"}
    titles.update({pair_column(a, b, objectives): f"{a} vs {b}" for a, b in combinations(objectives, 2)})
    return titles


def html_page(report: SweepReport) -> str:
    """A self-contained page (plotly.js inlined, works offline): interactive plots and the tables."""
    figures = [plotly_figure(report, x, y) for x, y in plots(report.runtime).values()]
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{name}")
        for i, (fig, name) in enumerate(zip(figures, plots(report.runtime), strict=True))
    ]
    facts = "".join(f"<li>{html.escape(f)}</li>" for f in _facts(report))
    table = report.orderings.to_html(index=False, float_format=lambda v: f"{v:.4g}", table_id="orderings", border=0)
    models = report.models.to_html(float_format=lambda v: f"{v:.4g}", table_id="models", border=0)
    style = "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{padding:3px 8px}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep {html.escape(report.sweep_id)}</title>"
        f"<style>{style}</style></head><body><h1>Sweep {html.escape(report.sweep_id)}</h1><ul>{facts}</ul>"
        f"<h2>Orderings, best first</h2>{table}<h2>Plots</h2>{''.join(parts)}"
        f"<h2>Every distinct model</h2>{models}</body></html>"
    )
