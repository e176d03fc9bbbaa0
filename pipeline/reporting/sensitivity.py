"""A sensitivity analysis written out: the ranked console table, a CSV (one row per layer and setting), the heatmap
(layers x settings, validation top-1 drop) as PNG and as a self-contained interactive HTML page, and the whole of it
logged on one MLflow run."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.core.formatting import format_bytes
from pipeline.sensitivity.analysis import SensitivityResult
from pipeline.tracking import TAGS, RunType, Tracker

CSV_FIELDS = ("layer", "kind", "params", "macs", "macs_share", "latency_share", "weight_bytes", "technique", "setting",
              "label", "val_top1", "drop", "params_removed", "macs_removed", "bytes_saved", "coupled")  # fmt: skip


def ranked_table(result: SensitivityResult) -> str:
    """Fixed-width: one row per layer, the most sensitive first; each setting's validation top-1 drop in points."""
    width = max([len(info.name) for info in result.layers] + [5])
    latency = any(info.latency_share is not None for info in result.layers)
    header = f"{'layer':<{width}} {'params':>8} {'MACs %':>6}" + (f" {'ORT %':>6}" if latency else "")
    header += "".join(f" {label:>9}" for label in result.labels)
    lines = [
        f"sensitivity of {result.model}: validation top-1 drop in points with one layer changed "
        f"(unchanged {result.base_top1:.2f}% on {result.images} images; '-': does not apply"
        + ("; ORT %: share of the batch-1 ONNX Runtime forward)" if latency else ")"),
        header,
        "-" * len(header),
    ]
    for info, cells in result.ranked():
        drops = "".join(f" {cells[label].drop:>9.2f}" if label in cells else f" {'-':>9}" for label in result.labels)
        share = "" if not latency else f" {100 * (info.latency_share or 0.0):>6.1f}"
        lines.append(f"{info.name:<{width}} {info.params / 1e3:>7.1f}k {100 * info.macs_share:>6.1f}{share}{drops}")
    return "\n".join(lines)


def write_csv(result: SensitivityResult, path: Path) -> Path:
    infos = {info.name: info for info in result.layers}
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for c in result.cells:
            info = infos[c.layer]
            writer.writerow({
                "layer": c.layer, "kind": info.kind, "params": info.params, "macs": info.macs,
                "macs_share": f"{info.macs_share:.6f}",
                "latency_share": "" if info.latency_share is None else f"{info.latency_share:.6f}",
                "weight_bytes": info.weight_bytes, "technique": c.technique,
                "setting": f"{c.setting:g}", "label": c.label, "val_top1": f"{c.val_top1:.4f}", "drop": f"{c.drop:.4f}",
                "params_removed": c.params_removed, "macs_removed": c.macs_removed, "bytes_saved": c.bytes_saved,
                "coupled": " ".join(c.coupled),
            })  # fmt: skip
    return path


def _matrix(result: SensitivityResult) -> list[list[float]]:
    """Drops by layer (model order) and column; NaN where a setting does not apply."""
    by = {(c.layer, c.label): c.drop for c in result.cells}
    return [[by.get((info.name, label), float("nan")) for label in result.labels] for info in result.layers]


def heatmap_png(result: SensitivityResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(_matrix(result), dtype=float)
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(1.1 * cols + 3.5, 0.32 * rows + 1.8), dpi=120)
    bound = max(float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0, 0.5)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(cols), result.labels, rotation=30, ha="right")
    ax.set_yticks(range(rows), [f"{i.name} ({format_bytes(i.weight_bytes)})" for i in result.layers], fontsize=7)
    for r in range(rows):
        for c in range(cols):
            if np.isfinite(values[r, c]):
                ax.text(c, r, f"{values[r, c]:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="validation top-1 drop (points)")
    ax.set_title(f"{result.model}: one layer changed at a time ({result.base_top1:.2f}% unchanged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap_html(result: SensitivityResult, path: Path) -> Path:
    """The heatmap with hover details (parameters, MACs share, what the change saves); plotly.js inlined, offline."""
    import plotly.graph_objects as go

    cells = {(c.layer, c.label): c for c in result.cells}
    hover = [[_hover(info, cells.get((info.name, label))) for label in result.labels] for info in result.layers]
    fig = go.Figure(go.Heatmap(
        z=_matrix(result), x=result.labels, y=[i.name for i in result.layers], colorscale="RdBu", reversescale=True,
        zmid=0, text=hover, hoverinfo="text", colorbar={"title": "top-1 drop"},
    ))  # fmt: skip
    fig.update_layout(
        title=f"Sensitivity of {result.model}: validation top-1 drop, one layer changed at a time",
        yaxis={"autorange": "reversed"}, height=max(400, 22 * len(result.layers) + 160),
    )  # fmt: skip
    path.write_text(fig.to_html(full_html=True, include_plotlyjs=True))
    return path


def _hover(info, cell) -> str:
    if cell is None:
        return f"{info.name}: does not apply"
    text = (f"{info.name} ({info.kind})<br>{cell.label}: top-1 {cell.val_top1:.2f}% (drop {cell.drop:+.2f})<br>"
            f"params {info.params:,}, MACs {100 * info.macs_share:.1f}% of the model<br>saves "
            f"{format_bytes(cell.bytes_saved)}")  # fmt: skip
    if cell.macs_removed:
        text += f", {cell.macs_removed:,} MACs"
    return text + (f"<br>also prunes: {', '.join(cell.coupled)}" if cell.coupled else "")


def write_report(result: SensitivityResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": write_csv(result, out_dir / "sensitivity.csv"),
        "png": heatmap_png(result, out_dir / "sensitivity.png"),
        "html": heatmap_html(result, out_dir / "sensitivity.html"),
    }
    (out_dir / "sensitivity.txt").write_text(ranked_table(result) + "\n")
    return files


def log_to_mlflow(result: SensitivityResult, out_dir: Path, tracker: Tracker, recipe_name: str) -> str:
    """One run (run_type sensitivity) with the grid as params, totals as metrics and the report files."""
    tags = {TAGS.run_type: RunType.SENSITIVITY, TAGS.recipe: recipe_name}
    with tracker.run(f"sensitivity {result.model}", tags) as run_id:
        cfg = result.config
        tracker.log_params(run_id, {
            "model_key": result.model_key, "images": result.images, "layers": len(result.layers),
            "settings": ", ".join(result.labels), "importance": cfg.importance,
            "calibration_batches": cfg.calibration_batches, "layer_patterns": " ".join(cfg.layers) or "all",
        })  # fmt: skip
        tracker.log_metrics(run_id, {
            "val_top1": result.base_top1, "evaluations": float(len(result.cells)),
            "evaluated": float(result.evaluated), "seconds": result.seconds,
            "max_drop": max((c.drop for c in result.cells), default=0.0),
        })  # fmt: skip
        tracker.log_artifacts(run_id, out_dir, "sensitivity")
    return run_id
