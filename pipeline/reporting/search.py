"""A search's outcome and report: its trials, the Pareto set of the feasible ones, the best model under the
constraints, the hypervolume after each trial, what early stopping and the cache saved, and (given a sweep) how its
frontier compares with the sweep's, measured by the same hypervolume code.

`outcome_of` reads the Optuna study (pure: no MLflow); `write_search_report` writes report.md (with PNG plots),
report.html (the same with interactive plots), trials.csv and pareto.csv. The plots are in `search_plots`.
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluator import test_name
from pipeline.pareto import hypervolume, pareto_mask
from pipeline.reporting.formatting import format_metric
from pipeline.reporting.search_plots import frontier_figure, hypervolume_figure, plot_frontier, plot_hypervolume
from pipeline.search_config import ORDERING_PARAM, Constraint


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the report needs it."""

    number: int
    state: str  # COMPLETE, FAIL, RUNNING, WAITING
    chain: str  # the ordering it ran
    params: dict[str, Any]
    metrics: dict[str, float]
    constraints: dict[str, float]  # constraint -> violation (<= 0 satisfied)
    early_stopped: str | None
    run_id: str | None
    deploy_dir: str | None
    accounting: dict[str, int]
    seconds: float | None
    baseline: dict[str, float]
    interrupted: bool = False  # stopped by Ctrl-C or a kill: rerun with the same settings when the search resumes
    retried: bool = False  # failed by a stale heartbeat (its worker died) and retried by Optuna

    @property
    def settings(self) -> dict[str, Any]:
        """The sampled stage settings, the ordering left out."""
        return {k: v for k, v in self.params.items() if k != ORDERING_PARAM}

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"

    @property
    def configuration(self) -> tuple:
        """What the trial ran: its ordering and settings, floats to 12 significant digits (`pipeline.search` runs a
        stepped float so: 0.6000000000000001 and 0.6 are one configuration)."""
        settings = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in self.settings.items()}
        return (self.chain, tuple(sorted(settings.items())))

    @property
    def feasible(self) -> bool:
        """Finished to its last stage and within every constraint."""
        return self.complete and self.early_stopped is None and all(v <= 0 for v in self.constraints.values())


def trial_records(study) -> list[TrialRecord]:
    """Every trial of an Optuna study of `pipeline.search`, oldest first."""
    out = []
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    for t in trials:
        attrs = t.user_attrs
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        accounting = {k: int(v) for k, v in attrs.items() if k.startswith(("stages_", "epochs_"))}
        out.append(
            TrialRecord(
                t.number,
                t.state.name,
                attrs.get("chain", t.params.get(ORDERING_PARAM, "?")),
                dict(t.params),
                dict(attrs.get("metrics", {})),
                dict(t.constraints),
                attrs.get("early_stopped"),
                attrs.get("run_id"),
                attrs.get("deploy_dir"),
                accounting,
                seconds,
                dict(attrs.get("baseline", {})),
                bool(attrs.get("interrupted")),
                t.number in retried,
            )
        )
    return out


@dataclass
class Geometry:
    """How hypervolumes are measured: the objectives, their reference point (a bound of the constraints, else the
    uncompressed baseline for a metric to lower, else the worst value seen) and each objective's scale (its spread
    over every point compared), so the same code measures any set of points alike."""

    objectives: dict[str, str]
    reference: np.ndarray
    scale: np.ndarray

    @property
    def maximize(self) -> list[bool]:
        return [d == "max" for d in self.objectives.values()]

    def volume(self, points: np.ndarray) -> float:
        return hypervolume(points, self.maximize, self.reference, self.scale) if len(points) else 0.0


def geometry(
    objectives: dict[str, str], constraints: list[Constraint], baseline: dict[str, float], points: list[np.ndarray]
) -> Geometry:
    """The reference point and scales for hypervolumes over `points` (arrays of n x objectives, stacked).

    Per objective, the reference is the constraint's bound when one bounds it in the objective's direction; else the
    worst value among the points (and, for a metric to lower, the uncompressed baseline's), pushed out by a tenth of
    the spread so that the worst point still adds volume. The scale is the spread from the reference to the best."""
    usable = [p for p in points if len(p)]
    stacked = np.vstack(usable) if usable else np.zeros((0, len(objectives)))
    reference, scale = [], []
    for i, (metric, direction) in enumerate(objectives.items()):
        column = list(stacked[:, i]) if len(stacked) else []
        if direction == "min" and metric in baseline:
            column.append(baseline[metric])
        column = np.array(column or [0.0], dtype=float)
        worst = column.min() if direction == "max" else column.max()
        best = column.max() if direction == "max" else column.min()
        bounds = [c.bound for c in constraints if c.metric == metric and (c.op == ">=") == (direction == "max")]
        if bounds:
            ref = max(bounds) if direction == "max" else min(bounds)
        else:
            margin = 0.1 * (abs(best - worst) or abs(worst) or 1.0)
            ref = worst - margin if direction == "max" else worst + margin
        reference.append(float(ref))
        spread = float(abs(ref - best))
        scale.append(spread if spread > 0 else 1.0)
    return Geometry(dict(objectives), np.array(reference), np.array(scale))


@dataclass
class SearchOutcome:
    search_id: str
    objectives: dict[str, str]
    constraints: list[Constraint]
    selection: tuple[str, str]  # (metric, direction) that picks the best feasible model
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    best: TrialRecord | None
    geometry: Geometry
    hypervolume_history: list[tuple[int, float]] = field(default_factory=list)  # (trial number, after it)

    @property
    def hypervolume(self) -> float:
        return self.hypervolume_history[-1][1] if self.hypervolume_history else 0.0

    def on_front(self) -> set[int]:
        """Every trial whose model is in the Pareto set, repeats of those models included."""
        keys = {model_key(t, self.objectives) for t in self.pareto}
        return {t.number for t in self.trials if t.feasible and model_key(t, self.objectives) in keys}

    def totals(self) -> dict[str, float]:
        """The search's counts, logged as metrics of its MLflow run."""
        complete = [t for t in self.trials if t.complete]
        acc = {k: sum(t.accounting.get(k, 0) for t in complete) for k in _ACCOUNTING}
        # A repeat that ended early skipped what the first trial of its configuration skipped; without early stopping
        # that first trial would have trained it and the repeat found it in the cache: a skip is counted once.
        repeats = repeat_of(self.trials)
        firsts = [t for t in complete if t.number not in repeats]
        for k in ("stages_skipped", "epochs_skipped"):
            acc[k] = sum(t.accounting.get(k, 0) for t in firsts)
        to_train = acc["epochs_trained"] + acc["epochs_skipped"]  # what the trials would have trained, not stopped
        stages = acc["stages_trained"] + acc["stages_reused"]
        return {
            "trials_complete": len(complete),
            # Samplers propose a point again (a small discrete space makes that common); the cache answers it.
            "trials_repeated": len(repeats),
            "trials_failed": sum(t.state == "FAIL" and not (t.interrupted or t.retried) for t in self.trials),
            "trials_early_stopped": sum(t.early_stopped is not None for t in complete),
            "trials_feasible": sum(t.feasible for t in self.trials),
            "pareto_size": len(self.pareto),
            "hypervolume": self.hypervolume,
            **{k: float(v) for k, v in acc.items()},
            "epochs_skipped_share": acc["epochs_skipped"] / to_train if to_train else 0.0,
            "stage_cache_hit_share": acc["stages_reused"] / stages if stages else 0.0,
        }


_ACCOUNTING = ("stages_trained", "stages_reused", "stages_skipped", "epochs_trained", "epochs_reused", "epochs_skipped")


def repeat_of(trials: list[TrialRecord]) -> dict[int, int]:
    """Finished trial number -> the earlier finished trial that ran the same configuration (repeats only)."""
    first: dict[tuple, int] = {}
    out = {}
    for t in sorted((t for t in trials if t.complete), key=lambda t: t.number):
        if t.configuration in first:
            out[t.number] = first[t.configuration]
        else:
            first[t.configuration] = t.number
    return out


def model_key(trial: TrialRecord, objectives: dict[str, str]) -> tuple:
    """A model as the Pareto set sees it: a repeat answered by the cache has its first trial's key."""
    return (trial.configuration, tuple(trial.metrics.get(m) for m in objectives))


def objective_values(trials: list[TrialRecord], objectives: dict[str, str]) -> np.ndarray:
    return np.array([[t.metrics[m] for m in objectives] for t in trials], dtype=float).reshape(-1, len(objectives))


def outcome_of(study, plan) -> SearchOutcome:
    """The outcome of a `pipeline.search` study, for `plan` (a SearchPlan)."""
    cfg = plan.config
    from pipeline.evaluator import metric_catalogue

    direction = metric_catalogue(plan.recipe.deploy.runtimes)[cfg.selection_metric][0] or "max"
    return summarize(
        plan.search_id,
        trial_records(study),
        cfg.objectives,
        cfg.parsed_constraints(),
        (cfg.selection_metric, direction),
    )


def summarize(
    search_id: str,
    trials: list[TrialRecord],
    objectives: dict[str, str],
    constraints: list[Constraint],
    selection: tuple[str, str],
) -> SearchOutcome:
    """Pareto set, best feasible model and hypervolume history of a search's trials."""
    feasible = [t for t in trials if t.feasible and all(m in t.metrics for m in objectives)]
    values = objective_values(feasible, objectives)
    mask = pareto_mask(values, [d == "max" for d in objectives.values()]) if feasible else []
    front, points = [], set()
    for t, keep in zip(feasible, mask, strict=True):
        point = model_key(t, objectives)
        if keep and point not in points:  # a repeat answered by the cache is the same model: listed once
            front.append(t)
            points.add(point)
    baseline = next((t.baseline for t in trials if t.baseline), {})
    geo = geometry(objectives, constraints, baseline, [values])
    history, seen = [], []
    for trial in sorted(trials, key=lambda t: t.number):
        if not trial.complete:
            continue
        if trial in feasible:
            seen.append(trial)
        history.append((trial.number, geo.volume(objective_values(seen, objectives))))
    metric, direction = selection
    sign = -1.0 if direction == "max" else 1.0
    ranked = sorted(
        (t for t in feasible if metric in t.metrics),
        key=lambda t: (
            sign * t.metrics[metric],
            *[(-1 if d == "max" else 1) * t.metrics[m] for m, d in objectives.items()],
        ),
    )
    return SearchOutcome(
        search_id, dict(objectives), constraints, selection, trials, front, ranked[0] if ranked else None, geo, history
    )


# --- comparing with a sweep ---------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The search's Pareto set against a sweep's models that meet the same constraints, on one geometry."""

    sweep_id: str
    sweep_points: pd.DataFrame  # one row per finished sweep chain: label + objective columns, feasible ones only
    search_volume: float
    sweep_volume: float
    missed: list[TrialRecord]  # search Pareto points no sweep model dominates or equals
    sweep_dominated: list[str]  # sweep models some search Pareto point dominates
    sweep_equalled: list[str] = field(default_factory=list)  # sweep models a search Pareto point equals everywhere
    geometry: Geometry | None = None  # the one both volumes were measured on

    @property
    def sweep_standing(self) -> list[str]:
        """Sweep models no search Pareto point dominates or equals."""
        beaten = set(self.sweep_dominated) | set(self.sweep_equalled)
        return [label for label in map(str, self.sweep_points.index) if label not in beaten]


def compare_with_sweep(outcome: SearchOutcome, sweep_id: str, sweep_models: pd.DataFrame) -> Comparison:
    """`sweep_models`: one row per model (index: its label) with the objective columns. Both sets are measured
    with one geometry built from the union of their points."""
    objectives = outcome.objectives
    needed = list(dict.fromkeys([*objectives, *(c.metric for c in outcome.constraints)]))
    absent = [m for m in needed if m not in sweep_models.columns or sweep_models[m].isna().all()]
    if absent:
        raise ValueError(f"sweep {sweep_id!r} did not measure {', '.join(absent)}: its frontier cannot be compared")
    ok = sweep_models.dropna(subset=needed)
    for c in outcome.constraints:
        ok = ok.loc[np.array([c.violation(v) <= 0 for v in ok[c.metric]], dtype=bool)]
    if ok.empty:
        raise ValueError(f"no model of sweep {sweep_id!r} meets the search's constraints: nothing to compare with")
    mine, theirs = objective_values(outcome.pareto, objectives), ok[list(objectives)].to_numpy(dtype=float)
    baseline = next((t.baseline for t in outcome.trials if t.baseline), {})
    geo = geometry(objectives, outcome.constraints, baseline, [mine, theirs])
    signs = np.where(geo.maximize, -1.0, 1.0)

    def dominates_or_equals(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(((a * signs) <= (b * signs)).all())

    missed = [
        t for t, p in zip(outcome.pareto, mine, strict=True) if not any(dominates_or_equals(q, p) for q in theirs)
    ]
    dominated = [
        label
        for label, q in zip(ok.index, theirs, strict=True)
        if any(dominates_or_equals(p, q) and not np.array_equal(p, q) for p in mine)
    ]
    equalled = [label for label, q in zip(ok.index, theirs, strict=True) if any(np.array_equal(p, q) for p in mine)]
    return Comparison(
        sweep_id,
        ok,
        geo.volume(mine),
        geo.volume(theirs),
        missed,
        list(map(str, dominated)),
        list(map(str, equalled)),
        geo,
    )


# --- the documents ------------------------------------------------------------------------------------------------


def trials_frame(outcome: SearchOutcome) -> pd.DataFrame:
    rows = []
    front, repeats = outcome.on_front(), repeat_of(outcome.trials)
    for t in outcome.trials:
        row = {
            "trial": t.number,
            "state": t.state,
            "ordering": t.chain,
            "feasible": t.feasible,
            "pareto": t.number in front,  # its model is in the Pareto set (pareto.csv lists each model once)
            "repeat_of": repeats.get(t.number),
            "early_stopped": t.early_stopped or "",
            "seconds": t.seconds,
            **t.settings,
            **{m: t.metrics.get(m) for m in shown_metrics(outcome)},
            **t.accounting,
            "run_id": t.run_id,
        }
        rows.append(row)
    return pd.DataFrame(rows)


def shown_metrics(outcome: SearchOutcome) -> list[str]:
    """The objectives, the constrained metrics, each validation accuracy's test counterpart (reported beside it,
    never chosen on), then top-1 on both splits and the model's size."""
    chosen = [*outcome.objectives, *(c.metric for c in outcome.constraints)]
    reported = [test_name(m) for m in chosen if test_name(m) != m]
    return list(dict.fromkeys([*chosen, *reported, "val_top1", "top1", "artifact_bytes", "params", "macs"]))


def write_search_report(outcome: SearchOutcome, out_dir: Path, comparison: Comparison | None = None) -> list[Path]:
    """report.md, report.html, trials.csv, pareto.csv, frontier.png and hypervolume.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(outcome)
    paths = [out_dir / "trials.csv", out_dir / "pareto.csv"]
    frame.to_csv(paths[0], index=False, float_format="%.6g")
    listed = frame["trial"].isin([t.number for t in outcome.pareto]) if len(frame) else []
    frame[listed].to_csv(paths[1], index=False, float_format="%.6g") if len(frame) else frame.to_csv(paths[1])
    paths.append(plot_frontier(outcome, out_dir / "frontier.png", comparison))
    paths.append(plot_hypervolume(outcome, out_dir / "hypervolume.png"))
    text = search_markdown(outcome, comparison)
    paths.append(out_dir / "report.md")
    paths[-1].write_text(text)
    paths.append(out_dir / "report.html")
    figures = {
        "frontier.png": frontier_figure(outcome, shown_metrics(outcome), comparison),
        "hypervolume.png": hypervolume_figure(outcome),
    }
    paths[-1].write_text(_html(text, figures))
    return paths


def search_markdown(outcome: SearchOutcome, comparison: Comparison | None = None) -> str:
    totals = outcome.totals()
    objectives = ", ".join(f"{m} ({d})" for m, d in outcome.objectives.items())
    lines = [
        f"# Search `{outcome.search_id}`",
        "",
        f"- Objectives: {objectives}.",
        "- Every choice (the sampler's objectives, the constraints, the Pareto set, the best model) reads the "
        "validation split (`val_` metrics); the test split's figures (no `val_`) are reported beside them and were "
        "never chosen on.",
        f"- Constraints: {'; '.join(map(str, outcome.constraints)) or 'none'}.",
        f"- Trials: {int(totals['trials_complete'])} finished ({int(totals['trials_early_stopped'])} ended early, "
        f"{int(totals['trials_feasible'])} feasible), {int(totals['trials_failed'])} failed; "
        f"{int(totals['trials_repeated'])} repeated the ordering and settings of an earlier trial "
        f"({int(totals['trials_complete'] - totals['trials_repeated'])} distinct).",
        f"- Early stopping skipped {int(totals['stages_skipped'])} stage runs and {int(totals['epochs_skipped'])} "
        f"epochs: {totals['epochs_skipped_share']:.0%} of the "
        f"{int(totals['epochs_trained'] + totals['epochs_skipped'])} epochs the finished trials would otherwise have "
        "trained (a skip in a repeated configuration counted once; an upper bound: a skipped stage might have been "
        "in the cache).",
        f"- Stage cache (stages after the shared baseline): {int(totals['stages_reused'])} of "
        f"{int(totals['stages_reused'] + totals['stages_trained'])} stage runs reused "
        f"({totals['stage_cache_hit_share']:.0%}); {int(totals['epochs_trained'])} epochs trained.",
        f"- The uncompressed baseline: {_baseline_line(outcome)}.",
        f"- Hypervolume of the feasible Pareto set: {outcome.hypervolume:.4f} (objectives scaled by their spread; "
        f"reference point {_reference(outcome)}).",
        f"- Written {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        "## Best model under the constraints",
        "",
    ]
    if outcome.best is None:
        lines += ["No trial met every constraint: nothing is registered. Loosen a bound or search longer.", ""]
    else:
        b = outcome.best
        metric, direction = outcome.selection
        settings = b.settings
        lines += [
            f"Trial {b.number}, `{b.chain}` {json.dumps(settings)}: the feasible model with the "
            f"{'highest' if direction == 'max' else 'lowest'} {metric}.",
            "",
        ]
        lines += _table([b], outcome) + [""]
    lines += ["## Pareto set (feasible trials)", ""]
    lines += _table(outcome.pareto, outcome) if outcome.pareto else ["No feasible trial yet."]
    lines += ["", "![frontier](frontier.png)", "", "![hypervolume](hypervolume.png)", ""]
    if comparison is not None:
        lines += _comparison_markdown(outcome, comparison)
    stopped = [t for t in outcome.trials if t.early_stopped]
    if stopped:
        lines += ["## Trials ended early", ""]
        lines += [f"- trial {t.number} (`{t.chain}`): {t.early_stopped}" for t in stopped] + [""]
    lines += ["All trials: `trials.csv`; the Pareto set: `pareto.csv`; the plots, interactive: `report.html`.", ""]
    return "\n".join(lines)


def _baseline_line(outcome: SearchOutcome) -> str:
    baseline = next((t.baseline for t in outcome.trials if t.baseline), {})
    shown = [f"{m} {format_metric(m, baseline[m])}" for m in shown_metrics(outcome) if m in baseline]
    return ", ".join(shown) or "not measured yet"


def _reference(outcome: SearchOutcome) -> str:
    pairs = zip(outcome.objectives, outcome.geometry.reference, strict=True)
    return ", ".join(f"{m} {format_metric(m, r)}" for m, r in pairs)


def _table(trials: list[TrialRecord], outcome: SearchOutcome) -> list[str]:
    metrics = shown_metrics(outcome)
    head = ["trial", "ordering", "settings", *metrics]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.settings.items())
        cells = [str(t.number), f"`{t.chain}`", settings or "–", *[format_metric(m, t.metrics.get(m)) for m in metrics]]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _comparison_markdown(outcome: SearchOutcome, c: Comparison) -> list[str]:
    better = "larger" if c.search_volume > c.sweep_volume else "not larger"
    lines = [
        f"## Against sweep `{c.sweep_id}`",
        "",
        f"Both frontiers measured by the same code on one geometry (reference and scales from the union of the points; "
        f"sweep models outside the constraints left out: {len(c.sweep_points)} remain).",
        "",
        f"- Hypervolume: search {c.search_volume:.4f}, sweep {c.sweep_volume:.4f}: the search's is {better}"
        + (f" ({c.search_volume / c.sweep_volume:.2f}x)." if c.sweep_volume > 0 else "."),
        f"- Sweep models a search Pareto point dominates ({len(c.sweep_dominated)}): "
        f"{', '.join(c.sweep_dominated) or 'none'}.",
        f"- Sweep models a search Pareto point equals (the same model, from the shared stage cache, or the same "
        f"metrics) ({len(c.sweep_equalled)}): {', '.join(c.sweep_equalled) or 'none'}.",
        f"- Sweep models neither dominated nor equalled: {len(c.sweep_standing)}.",
        "",
        "Search Pareto points that no sweep model dominates or equals (what the hand-written sweep missed):",
        "",
    ]
    lines += _table(c.missed, outcome) if c.missed else ["none"]
    return [*lines, ""]


def _inline(text: str) -> str:
    """Markdown text as HTML: escaped, `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html(markdown_text: str, figures: dict[str, Any]) -> str:
    """A self-contained page that works offline: the Markdown's text and tables as HTML, each of its images replaced
    by the interactive plotly figure of the same name (plotly.js inlined once, with the first)."""
    body = []
    table: list[str] = []
    embedded = 0

    def flush() -> None:
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r.replace("|", "")) <= {"-"}]
            cells = []
            for i, row in enumerate(rows):
                tag = "th" if i == 0 else "td"
                cells.append("<tr>" + "".join(f"<{tag}>{_inline(c.strip())}</{tag}>" for c in row) + "</tr>")
            body.append("<table>" + "".join(cells) + "</table>")
            table.clear()

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("!["):
            name = line[line.index("(") + 1 : line.index(")")]
            div_id = "search-" + Path(name).stem
            body.append(figures[name].to_html(full_html=False, include_plotlyjs=embedded == 0, div_id=div_id))
            embedded += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
    )
    head = f"<head><meta charset='utf-8'><style>{style}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>"


__all__ = ["SearchOutcome", "TrialRecord", "compare_with_sweep", "outcome_of", "summarize", "write_search_report"]
