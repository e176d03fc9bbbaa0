"""The description a chain's MLflow run carries: its stages as a Markdown table, and where it stopped."""

from __future__ import annotations

from pipeline.core.formatting import format_bytes, format_number


def chain_note(summary, stopped: str | None = None) -> str:
    """The chain's stages as a Markdown table (top-1, artifact size, batch-1 p50 latency, training seconds), for
    the description of its MLflow run; `stopped`: where and why the chain stopped, if it did."""
    nan = float("nan")
    lines = [
        f"**{summary.ordering}** (recipe `{summary.recipe}`)",
        "",
        "| # | stage | cached | val top-1 % | test top-1 % | artifact | p50 ms | train s |",
        "| ---: | --- | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary.results:
        m = r.metrics
        lines.append(
            f"| {r.index} | {r.name} | {'yes' if r.cached else 'no'} | "
            f"{format_number(m.get('val_top1', nan), '.2f')} | {format_number(m.get('top1', nan), '.2f')} | "
            f"{format_bytes(m.get('artifact_bytes', nan))} | {format_number(m.get('latency_ms_p50', nan), '.2f')} | "
            f"{format_number(m.get('stage_seconds', nan), '.1f')} |"
        )
    seconds = sum(r.metrics.get("stage_seconds", 0.0) for r in summary.results)
    lines += ["", f"p50: batch-1 median latency, torch eager. Training: {seconds:.1f} s in all."]
    if stopped:
        lines += ["", f"**Stopped at stage {stopped}**"]
    return "\n".join(lines)
