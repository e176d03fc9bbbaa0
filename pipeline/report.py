"""Reports: the run summary printed after `run`, and a sweep's Pareto-frontier report.

A sweep report reads the sweep's runs back from MLflow (`Tracker.read_sweep`) into pandas and writes
`reports/<sweep>/`: report.md and orderings.csv / models.csv (every ordering's final metrics, best first, with
deltas vs the baseline; every distinct model with its frontier flags), one PNG per plot, and report.html (the
same plots, interactive, with the tables). The same folder is logged as artifacts of the sweep's MLflow run.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import pandas as pd

from pipeline.pareto import Direction, frontiers, pair_column
from pipeline.tracking import TAGS, RunRecord, RunType, SweepRuns, records_from_frame

log = logging.getLogger("pipeline")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REPORTS_DIR = PROJECT_ROOT / "reports"
RUNTIMES = ("onnxruntime", "openvino")
REPORT_RUNTIMES = ("torch", *RUNTIMES)  # torch = the artifact in PyTorch eager
RUNTIME_METRICS = ("top1", "latency_ms_p50", "file_bytes")
METRIC_COLUMNS = (
    "top1", "artifact_bytes", "latency_ms_p50", "params", "macs", "stage_seconds",
    *(f"{r}.{m}" for r in RUNTIMES for m in RUNTIME_METRICS),
)  # fmt: skip
LABELS = {
    "top1": "top-1 accuracy (%)",
    "artifact_bytes": "artifact size (bytes)",
    "latency_ms_p50": "p50 latency, batch 1 (ms)",
    "file_bytes": "runtime file (bytes)",
}


def top1_column(runtime: str) -> str:
    """The metric holding top-1 as measured in `runtime` ('torch': the artifact in PyTorch)."""
    return "top1" if runtime == "torch" else f"{runtime}.top1"


def latency_column(runtime: str) -> str:
    """The metric holding batch-1 p50 latency in `runtime`."""
    return "latency_ms_p50" if runtime == "torch" else f"{runtime}.latency_ms_p50"


def report_objectives(runtime: str) -> dict[str, Direction]:
    """The report's frontier objectives in `runtime`: accuracy up, artifact size and batch-1 latency down."""
    return {top1_column(runtime): "max", "artifact_bytes": "min", latency_column(runtime): "min"}


def label(column: str) -> str:
    """Axis label of a metric column, naming the runtime it was measured in."""
    runtime, _, metric = column.rpartition(".")
    if column in ("top1", "latency_ms_p50"):
        runtime = "torch eager"
    return f"{LABELS.get(metric, metric)} [{runtime}]" if runtime else LABELS.get(metric, metric)


def plots(runtime: str) -> dict[str, tuple[str, str]]:
    """Plot file name -> (x, y) columns."""
    top1 = top1_column(runtime)
    return {"accuracy_vs_latency": (latency_column(runtime), top1), "accuracy_vs_size": ("artifact_bytes", top1)}


def _bytes(n: float) -> str:
    if n != n:  # NaN: not measured
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


SHORT = {"onnxruntime": "ort", "openvino": "ov"}


def summary_table(summary) -> str:
    """A fixed-width table: one row per stage with top1, size, latency (torch eager and each runtime) and time."""
    runtimes = [r for r in RUNTIMES if any(f"{r}.latency_ms_p50" in res.metrics for res in summary.results)]
    header = f"{'#':>2}  {'stage':<10} {'cached':<6} {'top1 %':>7} {'artifact':>10} {'torch p50':>9}"
    header += "".join(f" {SHORT[r] + ' top1':>8} {SHORT[r] + ' p50':>7}" for r in runtimes) + f" {'time s':>8}"
    lines = [f"recipe {summary.recipe} ({summary.ordering}), MLflow run {summary.run_id}", header, "-" * len(header)]
    for r in summary.results:
        m = r.metrics
        deployed = "".join(
            f" {m.get(f'{rt}.top1', float('nan')):>8.2f} {m.get(f'{rt}.latency_ms_p50', float('nan')):>7.3f}"
            for rt in runtimes
        )
        lines.append(
            f"{r.index:>2}  {r.name:<10} {'yes' if r.cached else 'no':<6} {m['top1']:>7.2f} "
            f"{_bytes(m['artifact_bytes']):>10} {m['latency_ms_p50']:>9.2f}{deployed} {r.seconds:>8.1f}"
        )
    if runtimes:
        lines.append("p50: batch-1 median latency in ms (torch eager; each runtime on the exported file)")
    reused = summary.reused
    lines.append(f"reused from cache: {', '.join(reused)}" if reused else "reused from cache: none")
    return "\n".join(lines)


def sweep_table(summary) -> str:
    """What one `sweep` invocation did: each ordering's final metrics and what it trained or reused."""
    plan = summary.plan
    runtimes = [rt for rt in RUNTIMES if any(f"{rt}.latency_ms_p50" in r.final for r in summary.results)]
    header = f"{'ordering':<28} {'status':<9} {'top1 %':>7} {'artifact':>10} {'torch p50':>9}"
    header += "".join(f" {SHORT[rt] + ' p50':>7}" for rt in runtimes) + f" {'trained':>7} {'reused':>6}"
    lines = [f"sweep {plan.sweep_id}, MLflow run {summary.run_id}", header, "-" * len(header)]
    for r in summary.results:
        m = r.final
        metrics = (
            f"{m['top1']:>7.2f} {_bytes(m['artifact_bytes']):>10} {m['latency_ms_p50']:>9.2f}"
            + "".join(f" {m.get(f'{rt}.latency_ms_p50', float('nan')):>7.3f}" for rt in runtimes)
            if m
            else f"{'-':>7} {'-':>10} {'-':>9}" + "".join(f" {'-':>7}" for _ in runtimes)
        )
        lines.append(f"{r.ordering:<28} {r.status:<9} {metrics} {len(r.executed):>7} {r.reused:>6}")
        if r.error:
            lines.append(f"    error: {r.error[:200]}")
    if summary.already_done:
        lines.append(f"finished in an earlier invocation: {', '.join(summary.already_done)}")
    for ordering, reason in plan.skipped:
        lines.append(f"skipped {'>'.join(ordering)}: {reason}")
    lines.append(
        f"stage runs: {summary.executed} executed, {summary.reused} reused from the cache "
        f"({plan.distinct_stages} distinct in the sweep, {plan.stage_slots} in all); {summary.seconds:.0f} s"
    )
    return "\n".join(lines)


# --- reading a sweep back --------------------------------------------------------------------------


@dataclass
class SweepReport:
    """A sweep's runs as tables. `points`: one row per (ordering, stage); `models`: one row per distinct
    model (cache key) with its frontier flags; `orderings`: each ordering's final model, best first."""

    sweep_id: str
    sweep: dict[str, object]
    points: pd.DataFrame
    models: pd.DataFrame
    orderings: pd.DataFrame
    runtime: str = "torch"

    @property
    def objectives(self) -> dict[str, Direction]:
        return report_objectives(self.runtime)


def default_runtime(runs: SweepRuns) -> str:
    """The sweep's first deploy runtime whose metrics were logged, else 'torch'."""
    tagged = [run.tags[TAGS.deploy_runtimes] for run in runs.stages if run.tags.get(TAGS.deploy_runtimes)]
    for runtime in tagged[0].split(",") if tagged else []:
        if runtime in RUNTIMES and any(latency_column(runtime) in run.metrics for run in runs.stages):
            return runtime
    return "torch"


def build_report(
    runs: SweepRuns, sweep_id: str, latency: dict[str, float] | None = None, runtime: str | None = None
) -> SweepReport:
    """Tables from a sweep's runs as `Tracker.read_sweep` returns them.

    `runtime`: whose top-1 and latency the frontiers use (default: `default_runtime`); `latency` (cache key -> ms)
    replaces that runtime's latency logged by each stage, e.g. with a side-by-side re-measurement."""
    runtime = runtime or default_runtime(runs)
    if runtime not in REPORT_RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(REPORT_RUNTIMES)}")
    chains = _latest_finished_chains(runs.chains)
    if not chains:
        raise ValueError(f"sweep {sweep_id!r} has no finished ordering yet; run `make sweep` first")
    stages = [run for run in runs.stages if run.parent_id in chains]
    points = _points(stages, chains)
    if runtime != "torch" and points[latency_column(runtime)].isna().all():
        raise ValueError(f"sweep {sweep_id!r} logged no {runtime} metrics (its recipe's deploy.runtimes)")
    if latency is not None:
        points[latency_column(runtime)] = points["cache_key"].map(latency)
    models = _models(points, runtime)
    orderings = _orderings(points, models, runtime)
    meta = _sweep_facts(runs, chains, stages)
    meta["latency_source"] = "side by side" if latency is not None else "per stage"
    meta["runtime"] = runtime
    return SweepReport(sweep_id, meta, points, models, orderings, runtime)


def _latest_finished_chains(chains: list[RunRecord]) -> dict[str, str]:
    """run id -> ordering of each ordering's latest FINISHED chain run (an ordering rerun: its latest run)."""
    latest: dict[str, RunRecord] = {}
    for run in sorted(chains, key=lambda r: r.start_time):
        if run.status == "FINISHED":
            latest[run.tags[TAGS.ordering]] = run
    return {run.run_id: ordering for ordering, run in latest.items()}


def _sweep_facts(runs: SweepRuns, chains: dict[str, str], stages: list[RunRecord]) -> dict[str, object]:
    """The sweep run's params and metrics, its id and recipe, the orderings that failed, the CPU it ran on."""
    sweep = max(runs.sweeps, key=lambda r: r.start_time, default=None)
    meta: dict[str, object] = {**sweep.params, **sweep.metrics} if sweep else {}
    meta["sweep"] = sweep.tags.get(TAGS.sweep) if sweep else None
    meta["run_id"] = sweep.run_id if sweep else None
    meta["recipe"] = sweep.tags.get(TAGS.recipe) if sweep else None
    finished = set(chains.values())
    failed = {run.tags[TAGS.ordering] for run in runs.chains if run.status == "FAILED"}
    meta["failed_orderings"] = sorted(failed - finished)
    cpu = [run.tags[TAGS.cpu_capability] for run in stages if run.tags.get(TAGS.cpu_capability)]
    meta["cpu_capability"] = cpu[0] if cpu else None
    return meta


def _points(stages: list[RunRecord], chains: dict[str, str]) -> pd.DataFrame:
    """One row per stage run of the finished orderings; a metric a stage did not log (e.g. an older run) is NaN,
    shown as "–". The ordering is its chain's (older stage runs carried it too; newer ones do not)."""
    rows = [
        {
            "run_id": run.run_id,
            "ordering": chains[run.parent_id],
            "stage": run.tags[TAGS.stage],
            "stage_index": int(run.tags[TAGS.stage_index]),
            "cache_key": run.tags[TAGS.cache_key],
            "cached": run.flag(TAGS.cached),
            **{metric: run.metrics.get(metric, float("nan")) for metric in METRIC_COLUMNS},
        }
        for run in stages
    ]
    return pd.DataFrame(rows).sort_values(["ordering", "stage_index"]).reset_index(drop=True)


def _models(points: pd.DataFrame, runtime: str) -> pd.DataFrame:
    """Distinct models (a shared prefix is one model), labelled by the shortest ordering prefix reaching them,
    with their frontier flags in `runtime` (`pareto`, `pareto_<a>__<b>`) and the 3-D flag in every runtime
    that was measured (`pareto[<runtime>]`)."""
    points = points.assign(
        path=[">".join(_path(o, i)) for o, i in zip(points.ordering, points.stage_index, strict=True)]
    )
    models = points.sort_values("stage_index").drop_duplicates("cache_key").set_index("cache_key")
    models = models[["path", "stage", "stage_index", *[c for c in METRIC_COLUMNS if c in models]]]
    objectives = report_objectives(runtime)
    flags = frontiers(models.dropna(subset=list(objectives)), objectives)
    for other in REPORT_RUNTIMES:
        measured = models.dropna(subset=list(report_objectives(other)))
        if not measured.empty:
            flags[f"pareto[{other}]"] = frontiers(measured, report_objectives(other))["pareto"]
    return models.join(flags).fillna({c: False for c in flags.columns}).astype({c: bool for c in flags.columns})


def _path(ordering: str, index: int) -> list[str]:
    return ["baseline", *ordering.split(">")[:index]] if index else ["baseline"]


def _orderings(points: pd.DataFrame, models: pd.DataFrame, runtime: str) -> pd.DataFrame:
    """Each ordering's final model: top-1 and latency in `runtime` (columns named by it), torch eager's beside."""
    baseline = points[points.stage_index == 0].iloc[0]
    finals = points.sort_values("stage_index").groupby("ordering").tail(1).set_index("ordering")
    top1, latency = top1_column(runtime), latency_column(runtime)
    out = pd.DataFrame(index=finals.index)
    out["stages"] = finals["stage_index"]
    out[top1] = finals[top1]
    out["delta_top1"] = finals[top1] - baseline[top1]
    out["artifact_bytes"] = finals["artifact_bytes"]
    out["size_ratio"] = finals["artifact_bytes"] / baseline["artifact_bytes"]
    out[latency] = finals[latency]
    out["speedup"] = baseline[latency] / finals[latency]
    if runtime != "torch":
        out["torch_latency_ms_p50"] = finals["latency_ms_p50"]
        out["torch_speedup"] = baseline["latency_ms_p50"] / finals["latency_ms_p50"]
        out[f"{runtime}.file_bytes"] = finals[f"{runtime}.file_bytes"]
    out["pareto"] = models.loc[finals["cache_key"], "pareto"].to_numpy()
    trained = points.groupby("ordering")["cached"].agg(lambda c: int((~c).sum()))
    out["stages_trained"] = trained.reindex(out.index)
    out = out.sort_values(["pareto", top1], ascending=[False, False])
    return out.reset_index()


# --- writing it ----------------------------------------------------------------------------------


def write_report(report: SweepReport, out_dir: Path) -> list[Path]:
    """Write report.md, orderings.csv, models.csv, one PNG per plot and report.html into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "orderings.csv", out_dir / "models.csv"]
    report.orderings.to_csv(paths[0], index=False, float_format="%.6g")
    report.models.to_csv(paths[1], float_format="%.6g")
    for name, (x, y) in plots(report.runtime).items():
        paths.append(_plot_png(report, x, y, out_dir / f"{name}.png"))
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
    lines += [f"## Pareto frontiers ({_runtime_name(report.runtime)})", ""]
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
    s, base = report.sweep, report.points[report.points.stage_index == 0].iloc[0]
    top1, latency = top1_column(report.runtime), latency_column(report.runtime)
    facts = [
        f"recipe `{s.get('recipe')}`, model `{s.get('model', '?')}`, dataset `{s.get('dataset', '?')}`, "
        f"executor `{s.get('executor', '?')}`; report written {time.strftime('%Y-%m-%d %H:%M')}",
        f"{len(report.orderings)} orderings finished; failed: {', '.join(s.get('failed_orderings') or []) or 'none'}"
        f"; skipped: {s.get('skipped', 'none')}",
        f"budget: {s.get('budget', 'none')}",
        f"baseline: {base[top1]:.2f} % top-1, {_bytes(base.artifact_bytes)}, {base[latency]:.2f} ms p50 "
        f"in {_runtime_name(report.runtime)}",
        f"accuracy and latency: {_runtime_name(report.runtime)} (`make report runtime=…` picks another of "
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


def _runtime_name(runtime: str) -> str:
    return "torch eager" if runtime == "torch" else runtime


def _orderings_markdown(report: SweepReport) -> str:
    runtime, orderings = report.runtime, report.orderings
    top1, latency = top1_column(runtime), latency_column(runtime)
    eager = runtime != "torch"
    head = f"p50 ms ({_runtime_name(runtime)})"
    lines = [
        f"| # | ordering | top1 % | Δ top1 (pts) | artifact | size × | {head} | speed-up |"
        + (" torch eager p50 ms | torch eager speed-up |" if eager else "")
        + " Pareto | stages trained |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" if eager else "")
        + " :---: | ---: |",
    ]
    for rank, r in enumerate(orderings.to_dict("records"), 1):
        extra = f" {_num(r['torch_latency_ms_p50'], '.2f')} | {_num(r['torch_speedup'], '.2f')}× |" if eager else ""
        lines.append(
            f"| {rank} | `{r['ordering']}` | {_num(r[top1], '.2f')} | {_num(r['delta_top1'], '+.2f')} | "
            f"{_bytes(r['artifact_bytes'])} | {_num(r['size_ratio'], '.3f')} | {_num(r[latency], '.2f')} | "
            f"{_num(r['speedup'], '.2f')}× |{extra} {'yes' if r['pareto'] else ''} | "
            f"{r['stages_trained']}/{r['stages'] + 1} |"
        )
    return "\n".join(lines)


def _num(value: float, spec: str) -> str:
    return "–" if value != value else format(value, spec)


def _frontier_titles(report: SweepReport) -> dict[str, str]:
    objectives = report.objectives
    titles = {"pareto": "3-D (" + ", ".join(objectives) + ")"}
    titles.update({pair_column(a, b, objectives): f"{a} vs {b}" for a, b in combinations(objectives, 2)})
    return titles


def _frontier_line(report: SweepReport, x: str, y: str) -> pd.DataFrame:
    return report.models[report.models[pair_column(x, y, report.objectives)]].sort_values(x)


def _plot_png(report: SweepReport, x: str, y: str, path: Path) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    markers = dict(zip(sorted(set(report.points.stage)), "*osD^vP<>", strict=False))
    for i, (ordering, path_points) in enumerate(report.points.groupby("ordering", sort=False)):
        color = plt.cm.tab10(i % 10)
        ax.plot(path_points[x], path_points[y], "-", color=color, alpha=0.7, label=ordering)
        for stage, pts in path_points.groupby("stage"):
            ax.scatter(pts[x], pts[y], color=color, marker=markers[stage], s=60, zorder=3, edgecolor="black", lw=0.4)
    front = _frontier_line(report, x, y)
    ax.step(front[x], front[y], where="post", color="black", ls="--", lw=1.2, label="Pareto frontier")
    ax.scatter(front[x], front[y], s=220, facecolors="none", edgecolors="black", lw=1.2, zorder=4)
    if x == "artifact_bytes":
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _bytes(v)))
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


def html_page(report: SweepReport) -> str:
    """A self-contained page (plotly.js inlined, works offline): interactive plots and the tables."""
    figures = [_plotly_figure(report, x, y) for x, y in plots(report.runtime).values()]
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


def _plotly_figure(report: SweepReport, x: str, y: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for ordering, pts in report.points.groupby("ordering", sort=False):
        text = [f"{ordering}<br>stage {i}: {s}" for i, s in zip(pts.stage_index, pts.stage, strict=True)]
        fig.add_trace(
            go.Scatter(
                x=pts[x],
                y=pts[y],
                mode="lines+markers",
                name=ordering,
                text=text,
                hovertemplate="%{text}<br>%{x}<br>%{y:.2f}<extra></extra>",
            )
        )
    front = _frontier_line(report, x, y)
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


REMEASURE_ROUNDS, REMEASURE_CALLS = 7, 100


def remeasure_latency(
    tracker,
    stages: list[RunRecord] | pd.DataFrame,
    runtime: str = "torch",
    rounds: int = REMEASURE_ROUNDS,
    calls: int = REMEASURE_CALLS,
) -> dict[str, float]:
    """Batch-1 p50 (ms, 1 thread) of every distinct model of a sweep in `runtime`, its artifact (torch) or exported
    file fetched from its stage run in MLflow and timed side by side with the others (interleaved rounds), so
    ratios are fair on a busy machine. `stages`: the sweep's stage runs (a `Tracker.runs_frame` works too);
    returns cache key -> ms."""
    import tempfile

    from pipeline.artifacts import load_artifact
    from pipeline.deploy import ONNX_FILE, OPENVINO_DIR, OPENVINO_XML, open_runtime
    from pipeline.evaluator import latency_side_by_side, predict_side_by_side

    if isinstance(stages, pd.DataFrame):
        stages = records_from_frame(stages)
    models = _distinct_finished_models(stages)
    log.info("re-measuring batch-1 latency of %d models in %s side by side (%d rounds x %d calls)",
             len(models), _runtime_name(runtime), rounds, calls)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if runtime == "torch":
            loaded = [load_artifact(tracker.download_artifact(run.run_id, "model/artifact.pt", Path(tmp) / str(i)))
                      for i, run in enumerate(models.values())]  # fmt: skip
            sizes = [tuple(m.pretrained_cfg["input_size"]) for m in loaded]
            medians = latency_side_by_side(loaded, sizes, threads=1, rounds=rounds, runs=calls)
        else:
            remote = f"deploy/{ONNX_FILE}" if runtime == "onnxruntime" else f"deploy/{OPENVINO_DIR}"
            predicts = []
            for i, run in enumerate(models.values()):
                local = tracker.download_artifact(run.run_id, remote, Path(tmp) / str(i))
                file = local / OPENVINO_XML if runtime == "openvino" else local
                predicts.append(open_runtime(runtime, file, threads=1, batch_size=1))
            medians = predict_side_by_side(predicts, _input_size(models.values()), rounds=rounds, runs=calls)
    return dict(zip(models, medians, strict=True))


def _distinct_finished_models(stages: list[RunRecord]) -> dict[str, RunRecord]:
    """cache key -> one FINISHED stage run that holds that model."""
    models: dict[str, RunRecord] = {}
    for run in stages:
        if run.tags.get(TAGS.run_type) == RunType.STAGE and run.status == "FINISHED":
            models.setdefault(run.tags[TAGS.cache_key], run)
    return models


def _input_size(stages) -> tuple[int, ...]:
    """The sweep's model input size (C, H, W), from the first stage's logged artifact metadata."""
    sizes = [run.tags[TAGS.input_size] for run in stages if run.tags.get(TAGS.input_size)]
    if not sizes:
        raise ValueError("the sweep's runs carry no input_size tag (logged by newer versions): rerun the sweep")
    return tuple(int(v) for v in sizes[0].split("x"))


def report_sweep(
    tracker,
    sweep_id: str | None = None,
    out_root: Path = REPORTS_DIR,
    remeasure: bool = False,
    runtime: str | None = None,
) -> tuple[SweepReport, Path]:
    """Read a sweep (the latest when `sweep_id` is None) from MLflow, write its report, log it to the sweep run.

    `runtime`: whose accuracy and latency the frontiers use (default: the sweep's first deploy runtime);
    `remeasure` times every distinct model again side by side in it instead of using each stage's figure."""
    if sweep_id is None:
        latest = tracker.sweep_runs()
        if not latest:
            raise ValueError("no sweep in the MLflow store yet; run `make sweep recipe=NAME` first")
        sweep_id = latest[0].tags[TAGS.sweep]
    runs = tracker.read_sweep(sweep_id)
    if runs.empty:
        raise ValueError(f"no runs with tags.sweep = {sweep_id!r} in {tracker.uri}")
    runtime = runtime or default_runtime(runs)
    latency = remeasure_latency(tracker, runs.stages, runtime) if remeasure else None
    report = build_report(runs, sweep_id, latency, runtime)
    if remeasure:
        report.sweep["latency_how"] = f"median of {REMEASURE_ROUNDS} interleaved rounds x {REMEASURE_CALLS} calls"
    out_dir = Path(out_root) / sweep_id
    write_report(report, out_dir)
    if report.sweep.get("run_id"):
        tracker.log_artifacts(str(report.sweep["run_id"]), out_dir, "report")
    log.info("report written to %s", out_dir)
    return report, out_dir
