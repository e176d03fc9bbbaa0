"""The report's plots, accuracy against batch-1 latency and against artifact size: one line per ordering from
the baseline through its stages (marker = stage), the 2-D Pareto frontier dashed; as PNG and SVG (matplotlib: report.md
and report.html) and as interactive plotly figures (report-interactive.html)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.analysis.pareto import pair_column
from pipeline.core.formatting import format_bytes
from pipeline.reporting.columns import latency_column, top1_column
from pipeline.reporting.sweep_tables import SweepReport

LABELS = {
    "val_top1": "validation top-1 accuracy (%)",
    "top1": "test top-1 accuracy (%)",
    "artifact_bytes": "artifact size (bytes)",
    "latency_ms_p50": "p50 latency, batch 1 (ms)",
    "file_bytes": "runtime file (bytes)",
}


def label(column: str) -> str:
    """Axis label of a metric column, naming the runtime it was measured in."""
    runtime, _, metric = column.rpartition(".")
    if column in ("val_top1", "top1", "latency_ms_p50"):
        runtime = "torch eager"
    return f"{LABELS.get(metric, metric)} [{runtime}]" if runtime else LABELS.get(metric, metric)


def plots(runtime: str, split: str) -> dict[str, tuple[str, str]]:
    """Plot file name -> (x, y) columns: accuracy on `split` (what the frontiers are chosen on)."""
    top1 = top1_column(runtime, split)
    return {"accuracy_vs_latency": (latency_column(runtime), top1), "accuracy_vs_size": ("artifact_bytes", top1)}


def frontier_line(report: SweepReport, x: str, y: str) -> pd.DataFrame:
    """The models on the 2-D frontier of (x, y), in the order of x."""
    return report.models[report.models[pair_column(x, y, report.objectives)]].sort_values(x)


def plot_image(report: SweepReport, x: str, y: str, path: Path) -> Path:
    """The plot of y against x as an image file at `path`, PNG or SVG by its suffix (a log axis for sizes); returns
    `path`."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text as text, not glyph paths: a few times smaller
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    markers = dict(zip(sorted(set(report.points.stage)), "*osD^vP<>", strict=False))
    for i, (ordering, chain_points) in enumerate(report.points.groupby("ordering", sort=False)):
        color = plt.cm.tab10(i % 10)
        for k, (_, path_points) in enumerate(chain_points.groupby("seed", sort=True)):  # one line per seed
            ax.plot(path_points[x], path_points[y], "-", color=color, alpha=0.7, label=None if k else ordering)
            for stage, pts in path_points.groupby("stage"):
                ax.scatter(pts[x], pts[y], color=color, marker=markers[stage], s=60, zorder=3, edgecolor="black",
                           lw=0.4)  # fmt: skip
        final = report.orderings[report.orderings.ordering == ordering]
        if len(final) and final["seeds"].iloc[0] > 1:  # the seeds' mean with its 95 % interval of top-1
            mean = final.iloc[0]
            ax.errorbar(mean[x], mean[y], yerr=[[mean[y] - mean["top1_ci_low"]], [mean["top1_ci_high"] - mean[y]]],
                        color=color, marker="_", ms=18, capsize=5, lw=2, zorder=5)  # fmt: skip
    front = frontier_line(report, x, y)
    ax.step(front[x], front[y], where="post", color="black", ls="--", lw=1.2, label="Pareto frontier")
    ax.scatter(front[x], front[y], s=220, facecolors="none", edgecolors="black", lw=1.2, zorder=4)
    if x == "artifact_bytes":
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: format_bytes(v)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel=label(x), ylabel=label(y), title=f"{report.sweep_id}: {label(y)} vs {label(x)}")
    handles = [plt.Line2D([], [], marker=m, ls="", color="grey", label=_stage_label(s)) for s, m in markers.items()]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _stage_label(stage: str) -> str:
    return "baseline (train)" if stage == "train" else stage


def plotly_figure(report: SweepReport, x: str, y: str):
    """The same plot as an interactive plotly figure (hover: ordering and stage)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (ordering, seed), pts in report.points.groupby(["ordering", "seed"], sort=False):
        name = f"{ordering} (seed {seed})" if report.sweep.get("seeds") else ordering
        text = [f"{name}<br>stage {i}: {s}" for i, s in zip(pts.stage_index, pts.stage, strict=True)]
        fig.add_trace(
            go.Scatter(
                x=pts[x],
                y=pts[y],
                mode="lines+markers",
                name=name,
                legendgroup=ordering,
                text=text,
                hovertemplate="%{text}<br>%{x}<br>%{y:.2f}<extra></extra>",
            )
        )
    seeded = report.orderings[report.orderings["seeds"] > 1]
    if len(seeded):
        fig.add_trace(
            go.Scatter(
                x=seeded[x],
                y=seeded[y],
                mode="markers",
                name="mean of seeds (95 % CI)",
                marker={"symbol": "line-ew-open", "size": 18},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": seeded["top1_ci_high"] - seeded[y],
                    "arrayminus": seeded[y] - seeded["top1_ci_low"],
                },  # fmt: skip
                text=list(seeded.ordering),
                hovertemplate="%{text}: mean %{y:.2f}<extra></extra>",
            )
        )
    front = frontier_line(report, x, y)
    fig.add_trace(
        go.Scatter(
            x=front[x],
            y=front[y],
            mode="lines+markers",
            line={"shape": "hv", "dash": "dash", "color": "black"},
            marker={"symbol": "circle-open", "size": 14},
            name="Pareto frontier",
            text=list(front.path),
            hovertemplate="%{text}<extra></extra>",
        )
    )
    fig.update_layout(title=f"{label(y)} vs {label(x)}", xaxis_title=label(x), yaxis_title=label(y), height=520)
    if x == "artifact_bytes":
        fig.update_xaxes(type="log")
    return fig
