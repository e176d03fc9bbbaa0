"""The sweep report's documents: report.md (the verdict, facts, the orderings table, the frontiers, the plots),
report.html (the same page with the plots as inline SVG: small, and it shows in MLflow's artifact viewer),
report-interactive.html (interactive plotly plots; self-contained, plotly.js inlined once, a few MB) and the CSV
tables beside them."""

from __future__ import annotations

import html
import time
from itertools import combinations
from pathlib import Path

from pipeline.analysis.pareto import pair_column
from pipeline.analysis.significance import best_or_tied, dominated_with_confidence, verdict_matrix
from pipeline.core.formatting import format_bytes, format_number
from pipeline.reporting.columns import latency_column, report_runtimes, runtime_name
from pipeline.reporting.markdown_html import markdown_page, svg_beside
from pipeline.reporting.plots import plot_image, plotly_figure, plots
from pipeline.reporting.sweep_tables import SweepReport
from pipeline.reporting.verdict import control_orderings, verdict_markdown

# The tables of report.html, by the heading above them (the ids tests and links use).
TABLE_IDS = {"Which ordering wins": "verdict", "Orderings, best first": "orderings"}


def write_report(report: SweepReport, out_dir: Path) -> list[Path]:
    """Write report.md, orderings.csv, models.csv, one PNG and one SVG per plot, report.html and
    report-interactive.html into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "orderings.csv", out_dir / "models.csv"]
    report.orderings.to_csv(paths[0], index=False, float_format="%.6g")
    report.models.to_csv(paths[1], float_format="%.6g")
    if report.pairs is not None:
        paths.append(out_dir / "comparisons.csv")
        report.pairs.to_csv(paths[-1], index=False, float_format="%.6g")
    for name, (x, y) in plots(report.runtime, report.split).items():
        paths += [plot_image(report, x, y, out_dir / f"{name}.{suffix}") for suffix in ("png", "svg")]
    text = markdown(report)
    paths.append(out_dir / "report.md")
    paths[-1].write_text(text)
    paths.append(out_dir / "report.html")

    paths[-1].write_text(markdown_page(text, f"Sweep {report.sweep_id}", svg_beside(out_dir), TABLE_IDS))
    paths.append(out_dir / "report-interactive.html")
    paths[-1].write_text(html_page(report))
    return paths


def markdown(report: SweepReport) -> str:
    """The report as Markdown: how the sweep ran, the orderings table, the frontiers, the plots."""
    s, top1 = report.sweep, report.top1
    lines = [f"# Sweep `{report.sweep_id}`", "", "## Which ordering wins", "", *verdict_markdown(report), ""]
    lines += ["## How the sweep ran", ""]
    lines += [f"- {line}" for line in _facts(report)]
    lines += ["", "## Orderings, best first", "", _orderings_markdown(report), ""]
    lines += [
        f"Pareto = the ordering's final model is on the 3-D frontier ({', '.join(report.objectives)}) "
        "of every model in the sweep, intermediate stages and baseline included. `control(N ep)` is the "
        "equal-training control: the baseline trained N more epochs in fp32; Δ vs control compares each "
        "ordering with the control of its own epochs (and seed).",
        "",
    ]
    lines += ["## Which differences the data supports", "", *_comparisons_markdown(report), ""]
    lines += [f"## Pareto frontiers ({runtime_name(report.runtime)})", ""]
    for column, title in _frontier_titles(report).items():
        on = report.models[report.models[column]].sort_values(top1, ascending=False)
        lines.append(
            f"- **{title}**: " + ", ".join(f"`{p}` ({t:.2f} %)" for p, t in zip(on.path, on[top1], strict=True))
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name}.png)" for name in plots(report.runtime, report.split)]
    lines += ["", "Interactive plots (plotly, a few MB): [report-interactive.html](report-interactive.html). "
              f"Sweep run in MLflow: `{s.get('run_id')}`.", ""]  # fmt: skip
    return "\n".join(lines)


def _facts(report: SweepReport) -> list[str]:
    """How the sweep ran: recipe, outcome, budget, baseline, runtime, stage runs, how latency was measured."""
    s, base = report.sweep, report.points[report.points.stage_index == 0].iloc[0]
    top1, latency = report.top1, latency_column(report.runtime)
    facts = [
        _split_fact(report),
        f"recipe `{s.get('recipe')}`, model `{s.get('model', '?')}`, dataset `{s.get('dataset', '?')}`, "
        f"executor `{s.get('executor', '?')}`; report written {time.strftime('%Y-%m-%d %H:%M')}",
        f"{len(report.orderings)} orderings finished; failed: {', '.join(s.get('failed_orderings') or []) or 'none'}"
        f"; skipped: {s.get('skipped', 'none')}",
        f"budget: {s.get('budget', 'none')}",
        f"baseline: {base[top1]:.2f} % {_split_name(report.split)} top-1 "
        f"({format_number(base[report.test_top1], '.2f')} % test), {format_bytes(base.artifact_bytes)}, "
        f"{base[latency]:.2f} ms p50 in {runtime_name(report.runtime)}",
        f"accuracy and latency: {runtime_name(report.runtime)} (`make report runtime=…` picks another of "
        f"{', '.join(r for r in report_runtimes() if r == 'torch' or report.points[latency_column(r)].notna().any())})",
    ]
    if "stage_runs_executed" in s:
        facts.append(
            f"stage runs: {s['stage_runs_executed']:.0f} executed, {s['stage_runs_reused']:.0f} reused from the "
            f"cache; sweep wall time {s.get('sweep_seconds', float('nan')) / 60:.1f} min"
        )
    if s.get("latency_source") == "side by side":
        eager = "" if report.runtime == "torch" else "; torch eager's columns keep each stage's own figure"
        facts.append(
            f"latency in {runtime_name(report.runtime)}: batch-1 p50 on 1 thread, re-measured at report time side "
            f"by side: {s.get('latency_how')}{eager}"
        )
    else:
        facts.append("latency: batch-1 p50 of each stage's model, measured right after the stage ran")
    if s.get("cpu_capability"):
        facts.append(f"CPU instruction set (torch): {s['cpu_capability']}")
    return facts


def _split_name(split: str) -> str:
    return "validation" if split == "val" else "test"


def _split_fact(report: SweepReport) -> str:
    """Which split the report chooses on, said first: rankings, frontiers and tests read validation top-1."""
    if report.split == "val":
        return ("chosen on the validation split: the ranking, the frontiers and the paired tests read validation "
                "top-1; the test split's top-1 is reported beside it and never chosen on")  # fmt: skip
    return ("**this sweep measured no validation split** (it ran before validation splits existed): its ranking, "
            "frontiers and tests read the test split they report, so the winner's figures are optimistic by the "
            "selection; rerun it to choose on validation")  # fmt: skip


def _orderings_markdown(report: SweepReport) -> str:
    runtime, orderings = report.runtime, report.orderings
    top1, latency, test = report.top1, latency_column(runtime), report.test_top1
    eager = runtime != "torch"
    head = f"p50 ms ({runtime_name(runtime)})"
    chosen = "val top1 %" if report.split == "val" else "top1 %"
    reported = " test top1 % |" if report.split == "val" else ""
    lines = [
        f"| # | ordering | {chosen} |{reported} Δ top1 (pts) | artifact | size × | {head} | speed-up |"
        + (" torch eager p50 ms | torch eager speed-up |" if eager else "")
        + " Pareto | stages trained |",
        "| ---: | --- | ---: |"
        + (" ---: |" if reported else "")
        + " ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" if eager else "")
        + " :---: | ---: |",
    ]
    num, seeded = format_number, _seeded(report)
    if seeded:
        lines[0] = lines[0].replace(
            f"| {chosen} |", f"| {chosen} (mean of {len(report.sweep['seeds'])} seeds [95 % CI]) |"
        )
    controlled = "delta_control" in orderings and orderings["delta_control"].notna().any()
    if controlled:  # the equal-training control: the baseline trained as long, in fp32
        lines[0] = lines[0].replace("| Δ top1 (pts) |", "| Δ top1 (pts) | Δ vs control (pts) |")
        lines[1] = lines[1].replace("| ---: | --- |", "| ---: | --- | ---: |", 1)
    for rank, r in enumerate(orderings.to_dict("records"), 1):
        extra = f" {num(r['torch_latency_ms_p50'], '.2f')} | {num(r['torch_speedup'], '.2f')}× |" if eager else ""
        delta = f"{num(r['delta_top1'], '+.2f')} |" + (f" {num(r['delta_control'], '+.2f')} |" if controlled else "")
        lines.append(
            f"| {rank} | `{r['ordering']}` | {_top1_cell(r, top1, seeded)} |"
            + (f" {num(r[test], '.2f')} |" if reported else "")
            + f" {delta} "
            f"{format_bytes(r['artifact_bytes'])} | {num(r['size_ratio'], '.3f')} | {num(r[latency], '.2f')} | "
            f"{num(r['speedup'], '.2f')}× |{extra} {'yes' if r['pareto'] else ''} | "
            f"{r['stages_trained']}/{(r['stages'] + 1) * r['seeds']} |"
        )
    return "\n".join(lines)


def _seeded(report: SweepReport) -> bool:
    return bool(report.sweep.get("seeds"))


def _top1_cell(r: dict, top1: str, seeded: bool) -> str:
    """Top-1, with its seed-to-seed 95 % interval when there are several seeds."""
    if not seeded:
        return format_number(r[top1], ".2f")
    return f"{r[top1]:.2f} [{format_number(r['top1_ci_low'], '.2f')}, {format_number(r['top1_ci_high'], '.2f')}]"


def _comparisons_markdown(report: SweepReport) -> list[str]:
    """What the paired tests support: the best ordering or who it is tied with, the verdict matrix, the pairs."""
    if report.pairs is None:
        return [report.pairs_how[0].upper() + report.pairs_how[1:] + "."]
    pairs = report.pairs
    names = [n for n in report.orderings.ordering if n in set(pairs.a) | set(pairs.b)]
    controls = control_orderings(report)
    compressed = pairs[~pairs.a.isin(controls) & ~pairs.b.isin(controls)]  # the control is a reference, not a rival
    if compressed.empty:
        return [f"How: {report.pairs_how}.", "", "Only one ordering besides the control: nothing to rank."]
    lines = [_verdict_sentence(compressed)]
    lines += [line for control in sorted(controls & set(names)) for line in ("", _against_control(pairs, control))]
    lines += ["", f"How: {report.pairs_how}.", "", "Verdicts, row vs column:", "", *_pair_tables(pairs, names)]
    if _seeded(report):
        costs = ["artifact_bytes", latency_column(report.runtime)]
        dominated = dominated_with_confidence(report.orderings.rename(columns={"ordering": "name"}), costs)
        lines += ["", "Dominated with confidence (another ordering's top-1 interval lies above theirs at no more "
                  f"mean bytes and latency): {', '.join(f'`{d}`' for d in dominated) or 'none'}."]  # fmt: skip
    return lines


def _verdict_sentence(pairs) -> str:
    """The most accurate ordering when the tests support it, else the leader and who it is tied with."""
    verdict = best_or_tied(pairs)
    if verdict.best is not None:
        return f"**`{verdict.best}` is the most accurate ordering**: significantly better than every other one."
    ties = ", ".join(f"`{n}` (p = {format_number(verdict.p_holm[n], '.3g')})" for n in verdict.tied_with)
    return (
        f"**No ordering is significantly the most accurate.** `{verdict.leader}` has the highest top-1 but is "
        f"tied with {ties} (Holm-adjusted p of the exact McNemar test)."
    )


def _against_control(pairs, control: str) -> str:
    """Which orderings beat the equal-training control significantly."""
    rows = pairs[(pairs.a == control) | (pairs.b == control)]
    beat = sorted({r.b if r.a == control else r.a for r in rows.itertuples()
                   if r.verdict == ("worse" if r.a == control else "better")})  # fmt: skip
    return (f"Against `{control}` (the baseline trained as long, in fp32), significantly better: "
            f"{', '.join(f'`{b}`' for b in beat) or 'none'}.")  # fmt: skip


def _pair_tables(pairs, names: list[str]) -> list[str]:
    """The verdict matrix, then every pair (smallest adjusted p first), as Markdown lines."""
    matrix = verdict_matrix(pairs, names)
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "| --- |" + " :---: |" * len(names)]
    lines += [f"| `{a}` | " + " | ".join(matrix.loc[a, b] or "·" for b in names) + " |" for a in names]
    lines += ["", "| a | b | Δ top1 a−b (pts) | 95 % interval | only a right | only b right | p (McNemar) | "
              "p (Holm) | verdict |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    num = format_number
    for r in pairs.sort_values("p_holm").to_dict("records"):
        lines.append(
            f"| `{r['a']}` | `{r['b']}` | {r['diff_pp']:+.2f} | [{num(r['ci_low_pp'], '+.2f')}, "
            f"{num(r['ci_high_pp'], '+.2f')}] | {r['a_only_correct']} | {r['b_only_correct']} | "
            f"{num(r['p_mcnemar'], '.3g')} | {num(r['p_holm'], '.3g')} | {r['verdict']} |"
        )
    return lines


def _frontier_titles(report: SweepReport) -> dict[str, str]:
    objectives = report.objectives
    titles = {"pareto": "3-D (" + ", ".join(objectives) + ")"}
    titles.update({pair_column(a, b, objectives): f"{a} vs {b}" for a, b in combinations(objectives, 2)})
    return titles


def _comparisons_html(report: SweepReport) -> str:
    """The verdict matrix as a heatmap (green: the row ordering is better) and the pairs table."""
    if report.pairs is None:
        return f"<p>{html.escape(report.pairs_how)}</p>"
    import plotly.graph_objects as go

    names = [n for n in report.orderings.ordering if n in set(report.pairs.a) | set(report.pairs.b)]
    matrix = verdict_matrix(report.pairs, names)
    score = matrix.replace({"better": 1, "tied": 0, "worse": -1, "": float("nan")}).astype(float)
    fig = go.Figure(go.Heatmap(z=score.to_numpy(), x=names, y=names, text=matrix.to_numpy(), texttemplate="%{text}",
                               zmin=-1, zmax=1, colorscale=[[0, "#d62728"], [0.5, "#eeeeee"], [1, "#2ca02c"]],
                               showscale=False))  # fmt: skip
    fig.update_layout(title="row vs column", height=120 + 60 * len(names), yaxis={"autorange": "reversed"})
    pairs = report.pairs.to_html(index=False, float_format=lambda v: f"{v:.4g}", table_id="pairs", border=0)
    how = html.escape(report.pairs_how)
    # This heatmap comes first on the page, so it carries plotly.js for the plots below it.
    return f"<p>{how}</p>{fig.to_html(full_html=False, include_plotlyjs=True, div_id='verdicts')}{pairs}"


def html_page(report: SweepReport) -> str:
    """report-interactive.html: a self-contained page (plotly.js inlined once, works offline), interactive plots and
    the tables."""
    shown = plots(report.runtime, report.split)
    figures = [plotly_figure(report, x, y) for x, y in shown.values()]
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0 and report.pairs is None), div_id=f"plot-{name}")
        for i, (fig, name) in enumerate(zip(figures, shown, strict=True))
    ]
    facts = "".join(f"<li>{html.escape(f)}</li>" for f in _facts(report))
    table = report.orderings.to_html(index=False, float_format=lambda v: f"{v:.4g}", table_id="orderings", border=0)
    models = report.models.to_html(float_format=lambda v: f"{v:.4g}", table_id="models", border=0)
    tests = _comparisons_html(report)
    style = "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{padding:3px 8px}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep {html.escape(report.sweep_id)}</title>"
        f"<style>{style}</style></head><body><h1>Sweep {html.escape(report.sweep_id)}</h1><ul>{facts}</ul>"
        f"<h2>Orderings, best first</h2>{table}<h2>Which differences the data supports</h2>{tests}"
        f"<h2>Plots</h2>{''.join(parts)}"
        f"<h2>Every distinct model</h2>{models}</body></html>"
    )
