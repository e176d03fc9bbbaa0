"""The console tables printed after `run` (one row per stage) and after `sweep` (one row per ordering), and the
chain's stage table in Markdown that describes its MLflow run."""

from __future__ import annotations

from pipeline.core.formatting import format_bytes
from pipeline.core.metrics import TORCH_REFERENCE_OPS
from pipeline.deploy import get_runtime, runtime_names

REFERENCE_NOTE = (
    "*: torch eager runs this int8 model as reference quantize / dequantize ops around fp32 kernels (it has no int8 "
    "kernels for it): that latency is not what ships, the runtimes' is"
)


def _torch_p50(metrics: dict) -> str:
    mark = "*" if metrics.get(TORCH_REFERENCE_OPS) else " "
    return f"{metrics['latency_ms_p50']:>8.2f}{mark}"


def summary_table(summary) -> str:
    """A fixed-width table: one row per stage with validation and test top1, size, latency (torch eager and each
    runtime) and time."""
    runtimes = [r for r in runtime_names() if any(f"{r}.latency_ms_p50" in res.metrics for res in summary.results)]
    header = f"{'#':>2}  {'stage':<10} {'cached':<6} {'val %':>6} {'test %':>6} {'artifact':>10} {'torch p50':>9}"
    header += (
        "".join(f" {get_runtime(r).short + ' top1':>8} {get_runtime(r).short + ' p50':>7}" for r in runtimes)
        + f" {'time s':>8}"
    )
    lines = [f"recipe {summary.recipe} ({summary.ordering}), MLflow run {summary.run_id}", header, "-" * len(header)]
    for r in summary.results:
        m = r.metrics
        deployed = "".join(
            f" {m.get(f'{rt}.top1', float('nan')):>8.2f} {m.get(f'{rt}.latency_ms_p50', float('nan')):>7.3f}"
            for rt in runtimes
        )
        lines.append(
            f"{r.index:>2}  {r.name:<10} {'yes' if r.cached else 'no':<6} {m.get('val_top1', float('nan')):>6.2f} "
            f"{m['top1']:>6.2f} "
            f"{format_bytes(m['artifact_bytes']):>10} {_torch_p50(m)}{deployed} {r.seconds:>8.1f}"
        )
    if runtimes:
        lines.append("p50: batch-1 median latency in ms (torch eager; each runtime on the exported file)")
    if any(r.metrics.get(TORCH_REFERENCE_OPS) for r in summary.results):
        lines.append(REFERENCE_NOTE)
    reused = summary.reused
    lines.append("val / test: top-1 % on the validation split (what choices read) and the test split (reported)")
    lines.append(f"reused from cache: {', '.join(reused)}" if reused else "reused from cache: none")
    return "\n".join(lines)


def sweep_table(summary) -> str:
    """What one `sweep` invocation did: each ordering's final metrics and what it trained or reused."""
    plan = summary.plan
    runtimes = [rt for rt in runtime_names() if any(f"{rt}.latency_ms_p50" in r.final for r in summary.results)]
    header = f"{'ordering':<28} {'status':<9} {'val %':>6} {'test %':>6} {'artifact':>10} {'torch p50':>9}"
    header += "".join(f" {get_runtime(rt).short + ' p50':>7}" for rt in runtimes) + f" {'trained':>7} {'reused':>6}"
    lines = [f"sweep {plan.sweep_id}, MLflow run {summary.run_id}", header, "-" * len(header)]
    for r in summary.results:
        m = r.final
        metrics = (
            f"{m.get('val_top1', float('nan')):>6.2f} {m['top1']:>6.2f} {format_bytes(m['artifact_bytes']):>10} "
            f"{_torch_p50(m)}" + "".join(f" {m.get(f'{rt}.latency_ms_p50', float('nan')):>7.3f}" for rt in runtimes)
            if m
            else f"{'-':>6} {'-':>6} {'-':>10} {'-':>9}" + "".join(f" {'-':>7}" for _ in runtimes)
        )
        lines.append(f"{r.ordering:<28} {r.status:<9} {metrics} {len(r.executed):>7} {r.reused:>6}")
        if r.error:
            lines.append(f"    error: {r.error[:200]}")
    if any(r.final and r.final.get(TORCH_REFERENCE_OPS) for r in summary.results):
        lines.append(REFERENCE_NOTE)
    if summary.already_done:
        lines.append(f"finished in an earlier invocation: {', '.join(summary.already_done)}")
    for ordering, reason in plan.skipped:
        lines.append(f"skipped {'>'.join(ordering)}: {reason}")
    lines.append(
        f"stage runs: {summary.executed} executed, {summary.reused} reused from the cache "
        f"({plan.distinct_stages} distinct in the sweep, {plan.stage_slots} in all); {summary.seconds:.0f} s"
    )
    return "\n".join(lines)
