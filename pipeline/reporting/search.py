"""A search's report: `write_search_report` writes a search's outcome (`pipeline.search.outcome`) as report.md (with
PNG plots), report.html (the same page, plots as inline SVG), report-interactive.html (plotly), trials.csv and
pareto.csv. The plots are in `search_plots`; the Description of the search's MLflow run is `search_note`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline.core.formatting import format_metric
from pipeline.core.metrics import test_name
from pipeline.reporting.markdown_html import markdown_page, svg_beside
from pipeline.reporting.search_plots import frontier_figure, hypervolume_figure, plot_frontier, plot_hypervolume
from pipeline.reporting.sweep_report import REPORTS_DIR, sweep_models
from pipeline.search.outcome import Comparison, SearchOutcome, TrialRecord, repeat_of
from pipeline.tracking import TAGS

log = logging.getLogger("pipeline")

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
            "pruned": t.pruned or "",
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
    """report.md, report.html, report-interactive.html, trials.csv, pareto.csv, and the frontier and hypervolume
    plots (PNG and SVG) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(outcome)
    paths = [out_dir / "trials.csv", out_dir / "pareto.csv"]
    frame.to_csv(paths[0], index=False, float_format="%.6g")
    listed = frame["trial"].isin([t.number for t in outcome.pareto]) if len(frame) else []
    frame[listed].to_csv(paths[1], index=False, float_format="%.6g") if len(frame) else frame.to_csv(paths[1])
    for suffix in ("png", "svg"):
        paths.append(plot_frontier(outcome, out_dir / f"frontier.{suffix}", comparison))
        paths.append(plot_hypervolume(outcome, out_dir / f"hypervolume.{suffix}"))
    text = search_markdown(outcome, comparison)
    paths.append(out_dir / "report.md")
    paths[-1].write_text(text)
    title = f"Search {outcome.search_id}"

    paths.append(out_dir / "report.html")
    paths[-1].write_text(markdown_page(text, title, svg_beside(out_dir)))
    figures = {
        "frontier.png": frontier_figure(outcome, shown_metrics(outcome), comparison),
        "hypervolume.png": hypervolume_figure(outcome),
    }

    def interactive(png: str) -> str:  # plotly.js inlined once, with the first figure
        first = png == next(iter(figures))
        return figures[png].to_html(full_html=False, include_plotlyjs=first, div_id="search-" + Path(png).stem)

    paths.append(out_dir / "report-interactive.html")
    paths[-1].write_text(markdown_page(text, title, interactive))
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
        *_pruner_lines(totals),
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
    if outcome.confirmed is not None:
        lines += _confirmed_markdown(outcome)
    if comparison is not None:
        lines += _comparison_markdown(outcome, comparison)
    stopped = [t for t in outcome.trials if t.early_stopped]
    if stopped:
        lines += ["## Trials ended early", ""]
        lines += [f"- trial {t.number} (`{t.chain}`): {t.early_stopped}" for t in stopped] + [""]
    lines += ["All trials: `trials.csv`; the Pareto set: `pareto.csv`; the plots, interactive (plotly, a few MB): "
              "[report-interactive.html](report-interactive.html).", ""]  # fmt: skip
    return "\n".join(lines)


def _pruner_lines(totals: dict[str, float]) -> list[str]:
    if not totals.get("trials_pruned"):
        return []
    trained = totals["epochs_trained"] + totals["epochs_pruned"]
    return [
        f"- Pruner: {int(totals['trials_pruned'])} trials stopped behind their peers (state PRUNED, never on the "
        f"frontier); stopping them saved {int(totals['epochs_pruned'])} epochs, "
        f"{totals['epochs_pruned'] / trained:.0%} of the {int(trained)} the trials would otherwise have trained "
        "(not counting what the cache would have answered)."
    ]


def _confirmed_markdown(outcome: SearchOutcome) -> list[str]:
    """The Pareto configurations over their seeds: mean and 95 % interval of each objective, which are on the
    frontier of the means, and the one registered."""
    assert outcome.confirmed is not None
    front = {p.trial.number for p in outcome.confirmed_front or []}
    chosen = outcome.confirmed_best.trial.number if outcome.confirmed_best is not None else None
    metrics = [m for m in shown_metrics(outcome) if any(m in p.values for p in outcome.confirmed)]
    lines = [
        "## Confirmed frontier (seed means)",
        "",
        f"Each configuration above ran again with more seeds (`search.confirm_seeds`); a cell is the mean over its "
        f"seeds [95 % t-interval]. The frontier of the means: {len(front)} configuration(s), hypervolume "
        f"{outcome.confirmed_hypervolume or 0.0:.4f} (the trials' own seeds: {outcome.hypervolume:.4f}, the best "
        "of single runs). The registered model is the configuration with the best mean "
        f"{outcome.selection[0]} on that frontier"
        + (
            f": trial {chosen}."
            if chosen is not None
            else "; none met every constraint on average, so nothing is registered."
        ),
        "",
    ]
    head = ["trial", "ordering", "seeds", "on frontier", *metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in outcome.confirmed:
        on = ("yes (registered)" if p.trial.number == chosen else "yes") if p.trial.number in front else "no"
        cells = [str(p.trial.number), f"`{p.trial.chain}`", ", ".join(map(str, p.seeds)), on]
        for m in metrics:
            if m not in p.values:
                cells.append("–")
                continue
            ci = p.interval(m)
            bounds = "" if ci.n < 2 else f" [{format_metric(m, ci.low)}, {format_metric(m, ci.high)}]"
            cells.append(f"{format_metric(m, ci.mean)}{bounds}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _baseline_line(outcome: SearchOutcome) -> str:
    baseline = next((t.baseline for t in outcome.trials if t.baseline), {})
    shown = [f"{m} {format_metric(m, baseline[m])}" for m in shown_metrics(outcome) if m in baseline]
    return ", ".join(shown) or "not measured yet"


def _reference(outcome: SearchOutcome) -> str:
    pairs = zip(outcome.objectives, outcome.geometry.reference, strict=True)
    return ", ".join(f"{m} {format_metric(m, r)}" for m, r in pairs)


def _table(trials: list[TrialRecord], outcome: SearchOutcome, link: Callable[[str], str] | None = None) -> list[str]:
    """Trials as a Markdown table; with `link` (run id -> URL), each trial's number links to its chain's run."""
    metrics = shown_metrics(outcome)
    head = ["trial", "ordering", "settings", *metrics]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.settings.items())
        number = f"[{t.number}]({link(t.run_id)})" if link and t.run_id else str(t.number)
        cells = [number, f"`{t.chain}`", settings or "–", *[format_metric(m, t.metrics.get(m)) for m in metrics]]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def search_note(outcome: SearchOutcome, run_link: Callable[[str], str], report_link: Callable[[str], str],
                registered: str | None = None) -> str:  # fmt: skip
    """The Description of the search's MLflow run: the chosen model, what was registered, the Pareto set and the
    confirmed seed means, each trial linked to its run (`run_link`), the report one click away (`report_link(file)`)."""
    lines = [f"### Search `{outcome.search_id}`: the best model under the constraints", ""]
    best = outcome.chosen
    if best is None:
        lines += ["**No trial met every constraint**: nothing is registered. Loosen a bound or search longer.", ""]
    else:
        how = "best mean over its seeds" if outcome.confirmed is not None else "best feasible trial"
        metric, direction = outcome.selection
        where = f"`{registered}` (alias `best`)" if registered else "nothing (registry off or failed)"
        lines += [f"**Chosen: trial {best.number}, `{best.chain}`** ({how}: the "
                  f"{'highest' if direction == 'max' else 'lowest'} {metric}); registered as {where}.", ""]  # fmt: skip
        lines += _table([best], outcome, run_link) + [""]
    lines += ["Every choice reads the validation split (`val_` metrics); the test split's figures are reported, never "
              f"chosen on. Constraints: {'; '.join(map(str, outcome.constraints)) or 'none'}.", "",
              "#### Pareto set (feasible trials; each number opens its run)", ""]  # fmt: skip
    lines += _table(outcome.pareto, outcome, run_link) if outcome.pareto else ["No feasible trial yet."]
    if outcome.confirmed is not None:
        lines += ["", *("#" + line if line.startswith("## ") else line for line in _confirmed_markdown(outcome))]
    lines += ["", f"**Full report**: [report.html]({report_link('report.html')}) (plots, every trial), also "
              f"[report.md]({report_link('report.md')}), `trials.csv` and `pareto.csv`."]  # fmt: skip
    return "\n".join(lines)


def _comparison_markdown(outcome: SearchOutcome, c: Comparison) -> list[str]:
    better = "larger" if c.search_volume > c.sweep_volume else "not larger"
    means = (" Seed means on both sides: the search's confirmed frontier, and each of the sweep's paths averaged "
             "over its seeds.") if c.means else ""  # fmt: skip
    lines = [
        f"## Against sweep `{c.sweep_id}`",
        "",
        f"Both frontiers measured by the same code on one geometry (reference and scales from the union of the points; "
        f"sweep models outside the constraints left out: {len(c.sweep_points)} remain).{means}",
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


def seed_means(models: pd.DataFrame) -> pd.DataFrame:
    """A sweep's models (`sweep_models`: one row per stage output, labelled 'baseline>prune [key]') averaged over its
    seeds: one row per path, the mean of the outputs that share it (a sweep runs each path once per seed)."""
    paths = models.index.to_series().str.replace(r" \[[0-9a-f]+\]$", "", regex=True)
    return models.groupby(paths.to_numpy()).mean(numeric_only=True)


def report_search(
    tracker, search_id: str | None = None, out_root: Path = REPORTS_DIR, against: str | None = None
) -> tuple[object, Path]:
    """Read a search (the latest when `search_id` is None) from its Optuna study and MLflow, write its report (against
    sweep `against`'s frontier when given) into `out_root/<search id>/`, and log it to the search's run."""

    from pipeline.search.confirm import confirmed_outcome
    from pipeline.search.outcome import compare_with_sweep
    from pipeline.search.study import load_search_plan, search_storage

    plan = load_search_plan(tracker, search_id)
    outcome = confirmed_outcome(plan, search_storage(plan, create=False, heartbeat=False), create=False)
    comparison = None
    if against:
        models = sweep_models(tracker, against, [*outcome.objectives, *(c.metric for c in outcome.constraints)])
        if outcome.confirmed_front is not None:  # seed means on both sides: the confirmed frontier, the sweep's paths
            comparison = compare_with_sweep(outcome.on_means(), against, seed_means(models), means=True)
        else:
            comparison = compare_with_sweep(outcome, against, models)
    out_dir = Path(out_root) / plan.search_id
    write_search_report(outcome, out_dir, comparison)
    runs = tracker.search_runs(plan.search_id)
    if runs:
        run_id = runs[0].run_id
        tracker.log_artifacts(run_id, out_dir, "report")
        note = search_note(outcome, tracker.run_link, lambda name: tracker.artifact_link(run_id, f"report/{name}"),
                           runs[0].tags.get(TAGS.registered_model))  # fmt: skip
        tracker.set_note(run_id, note)
    log.info("report written to %s", out_dir)
    return outcome, out_dir


__all__ = ["report_search", "search_markdown", "search_note", "write_search_report"]
