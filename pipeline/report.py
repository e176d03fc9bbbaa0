"""Human-readable summaries of runs (the sweep's Pareto reports will live here too)."""

from __future__ import annotations


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def summary_table(summary) -> str:
    """A fixed-width table: one row per stage with top1, size, latency and time taken."""
    header = f"{'#':>2}  {'stage':<10} {'cached':<6} {'top1 %':>7} {'artifact':>10} {'p50 ms':>8} {'time s':>8}"
    lines = [f"recipe {summary.recipe} ({summary.ordering}), MLflow run {summary.run_id}", header, "-" * len(header)]
    for r in summary.results:
        m = r.metrics
        lines.append(
            f"{r.index:>2}  {r.name:<10} {'yes' if r.cached else 'no':<6} {m['top1']:>7.2f} "
            f"{_bytes(m['artifact_bytes']):>10} {m['latency_ms_p50']:>8.2f} {r.seconds:>8.1f}"
        )
    reused = summary.reused
    lines.append(f"reused from cache: {', '.join(reused)}" if reused else "reused from cache: none")
    return "\n".join(lines)
