"""A search's plots: the trials against every pair of objectives (the Pareto set, feasible, infeasible and ended-early
trials, and a sweep's models when compared) and the hypervolume after each trial. Each plot comes as a PNG for
report.md and as an interactive plotly figure for report.html (hover: trial, ordering, settings, metrics)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.formatting import format_metric

if TYPE_CHECKING:
    from pipeline.search.outcome import Comparison, SearchOutcome, TrialRecord

# group -> (matplotlib colour, matplotlib marker, plotly colour, plotly symbol, opacity, marker size)
_STYLE = {
    "feasible": ("tab:blue", "o", "#1f77b4", "circle", 0.5, 30),
    "infeasible": ("grey", "x", "grey", "x", 0.6, 30),
    "ended early": ("tab:red", "v", "#d62728", "triangle-down", 0.6, 30),
    "Pareto set": ("black", "*", "black", "star", 1.0, 70),
}
_SWEEP_COLOUR = ("tab:green", "#2ca02c")


def objective_pairs(outcome: SearchOutcome) -> list[tuple[str, str]]:
    """Every pair of objectives, in the recipe's order (one objective is plotted against itself)."""
    return list(combinations(outcome.objectives, 2)) or [(next(iter(outcome.objectives)),) * 2]


def trial_groups(outcome: SearchOutcome) -> dict[str, list[TrialRecord]]:
    """The finished trials by what became of them; the Pareto set last, so it is drawn on top."""
    front = outcome.on_front()  # a repeat of a Pareto model is that model: drawn as one (the markers coincide)
    return {
        "feasible": [t for t in outcome.trials if t.feasible and t.number not in front],
        "infeasible": [t for t in outcome.trials if t.complete and not t.feasible and not t.early_stopped],
        "ended early": [t for t in outcome.trials if t.complete and t.early_stopped],
        "Pareto set": [t for t in outcome.trials if t.number in front],
    }


def _sweep_label(comparison: Comparison) -> str:
    return f"sweep {comparison.sweep_id}"


def plot_frontier(outcome: SearchOutcome, path: Path, comparison: Comparison | None = None) -> Path:
    """Every pair of objectives: trials (infeasible and ended-early ones marked), the Pareto set, the sweep's models."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text as text: a few times smaller
    import matplotlib.pyplot as plt

    pairs = objective_pairs(outcome)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs, strict=True):
        for name, trials in trial_groups(outcome).items():
            ts = [t for t in trials if x in t.metrics and y in t.metrics]
            if ts:
                colour, marker, _, _, alpha, size = _STYLE[name]
                ax.scatter(
                    [t.metrics[x] for t in ts],
                    [t.metrics[y] for t in ts],
                    c=colour,
                    marker=marker,
                    alpha=alpha,
                    s=size,
                    label=name,
                )
        if comparison is not None and len(comparison.sweep_points):
            ax.scatter(
                comparison.sweep_points[x],
                comparison.sweep_points[y],
                facecolors="none",
                edgecolors=_SWEEP_COLOUR[0],
                s=60,
                label=_sweep_label(comparison),
            )
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"search {outcome.search_id}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hypervolume(outcome: SearchOutcome, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text as text: a few times smaller
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if outcome.hypervolume_history:
        numbers, volumes = zip(*outcome.hypervolume_history, strict=True)
        ax.step(numbers, volumes, where="post")
        ax.plot(numbers, volumes, "o", ms=3)
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume of the feasible Pareto set")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hover(trial: TrialRecord, metrics: list[str]) -> str:
    lines = [f"trial {trial.number}: {trial.chain}"]
    lines += [f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in trial.settings.items()]
    lines += [f"{m}: {format_metric(m, trial.metrics.get(m))}" for m in metrics]
    if trial.early_stopped:
        lines.append(f"ended early: {trial.early_stopped}")
    return "<br>".join(lines)


def frontier_figure(outcome: SearchOutcome, metrics: list[str], comparison: Comparison | None = None):
    """The frontier plot as an interactive plotly figure: one panel per pair of objectives, one legend entry per
    group (clicking it hides the group in every panel), hover naming the trial, its ordering, settings and `metrics`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = objective_pairs(outcome)
    fig = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.08)
    for col, (x, y) in enumerate(pairs, start=1):
        for name, trials in trial_groups(outcome).items():
            ts = [t for t in trials if x in t.metrics and y in t.metrics]
            if not ts:
                continue
            _, _, colour, symbol, alpha, size = _STYLE[name]
            fig.add_trace(
                go.Scatter(
                    x=[t.metrics[x] for t in ts],
                    y=[t.metrics[y] for t in ts],
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    marker={"color": colour, "symbol": symbol, "opacity": alpha, "size": 14 if size > 50 else 9},
                    text=[_hover(t, metrics) for t in ts],
                    hovertemplate="%{text}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        if comparison is not None and len(comparison.sweep_points):
            points = comparison.sweep_points
            fig.add_trace(
                go.Scatter(
                    x=points[x],
                    y=points[y],
                    mode="markers",
                    name=_sweep_label(comparison),
                    legendgroup="sweep",
                    showlegend=col == 1,
                    marker={"color": "rgba(0,0,0,0)", "line": {"color": _SWEEP_COLOUR[1], "width": 1.5}, "size": 10},
                    text=[
                        "<br>".join([str(label), *(f"{m}: {format_metric(m, row[m])}" for m in outcome.objectives)])
                        for label, row in points.iterrows()
                    ],
                    hovertemplate="%{text}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=x, row=1, col=col)
        fig.update_yaxes(title_text=y, row=1, col=col)
    fig.update_layout(title=f"search {outcome.search_id}", height=480, template="plotly_white")  # page-wide
    return fig


def hypervolume_figure(outcome: SearchOutcome):
    """The hypervolume after each finished trial, as an interactive plotly figure."""
    import plotly.graph_objects as go

    by_number = {t.number: t for t in outcome.trials}
    numbers = [n for n, _ in outcome.hypervolume_history]
    volumes = [v for _, v in outcome.hypervolume_history]
    fig = go.Figure(
        go.Scatter(
            x=numbers,
            y=volumes,
            mode="lines+markers",
            line={"shape": "hv"},
            name="hypervolume",
            text=[f"trial {n}: {by_number[n].chain}" for n in numbers],
            hovertemplate="%{text}<br>hypervolume %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis_title="trial",
        yaxis_title="hypervolume of the feasible Pareto set",
        height=380,
        template="plotly_white",
    )
    return fig
