"""How reports write numbers."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """A byte count with its unit (1000-based: KB, MB, GB); NaN (not measured) as "–"."""
    if n != n:  # NaN: not measured
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def format_number(value: float, spec: str) -> str:
    """`value` formatted with `spec`; NaN (not measured) as "–"."""
    return "–" if value != value else format(value, spec)


def format_metric(metric: str, value: float | None) -> str:
    """A metric as reports show it: bytes with their unit, counts in millions, top-k with two decimals."""
    if value is None or value != value:
        return "–"
    if metric.endswith("bytes") or metric.endswith("bytes_zip"):
        return format_bytes(value)
    if metric in ("params", "macs", "nonzero_params"):
        return f"{value / 1e6:.2f} M"
    return f"{value:.2f}" if "top" in metric else f"{value:.4g}"
