"""Sweep reports from runs read back out of MLflow: tables, frontiers, files, a real browser, the MLflow UI.

The sweep here is written straight through the Tracker with known metrics (no training), so every
expected row and frontier member is worked out by hand.
"""

from __future__ import annotations

import html
import json
import re
import urllib.request

import pytest

from pipeline.reporting.pages import markdown
from pipeline.reporting.sweep_report import report_sweep
from pipeline.reporting.sweep_tables import build_report
from pipeline.tracking import Tracker
from tests.conftest import mlflow_process, rendered_dom

SWEEP = "toy-sweep-0000"
# model -> (top1 %, artifact bytes, p50 ms); 'ab' is the output of stage a then b, and so on.
MODELS = {
    "base": (80.0, 20e6, 4.0),
    "a": (79.0, 5e6, 1.5),
    "ab": (78.0, 1e6, 1.4),
    "b": (80.5, 4e6, 4.0),
    "ba": (77.0, 1e6, 1.3),
}
ORDERINGS = {"a>b": ["base", "a", "ab"], "b>a": ["base", "b", "ba"], "a": ["base", "a"]}


# The same models' batch-1 p50 (ms) in OpenVINO, where the ranking differs from torch eager's.
OPENVINO_MS = {"base": 1.0, "a": 0.9, "ab": 0.5, "b": 0.3, "ba": 0.35}


def write_toy_sweep(
    tracker: Tracker,
    openvino: bool = False,
    orderings: dict[str, list[str]] = ORDERINGS,
    models: dict[str, tuple[float, float, float]] = MODELS,
) -> str:
    """A finished sweep of three orderings sharing the baseline (and `a` as a prefix), as the runner logs it
    (its stage runs tagged `ordering` as before `chain_ordering`: reports read a stage's ordering from its chain);
    `openvino`: the stages were also measured in OpenVINO (OPENVINO_MS). Other `orderings` and `models` (same
    shapes as ORDERINGS and MODELS) write another sweep under the same id."""
    with tracker.run("sweep toy", {"sweep": SWEEP, "run_type": "sweep", "recipe": "toy"}) as sweep_run:
        tracker.log_params(sweep_run, {"model": "toy_net", "dataset": "cifar10", "executor": "local"})
        seen: set[str] = set()
        for ordering, path in orderings.items():
            tags = {"sweep": SWEEP, "ordering": ordering, "recipe": "toy"}
            with tracker.run(ordering, {**tags, "run_type": "chain"}, parent_id=sweep_run) as chain_run:
                for index, model in enumerate(path):
                    stage = "train" if index == 0 else ordering.split(">")[index - 1]
                    top1, size, latency = models[model]
                    stage_tags = {**tags, "run_type": "stage", "stage": stage, "stage_index": str(index),
                                  "cache_key": model, "cached": str(model in seen).lower(),
                                  "deploy_runtimes": "openvino" if openvino else "none"}  # fmt: skip
                    seen.add(model)
                    with tracker.run(f"{index}-{stage}", stage_tags, parent_id=chain_run) as stage_run:
                        metrics = {"top1": top1, "artifact_bytes": size, "latency_ms_p50": latency, "params": 1.0}
                        if openvino:
                            metrics |= {"openvino.top1": top1, "openvino.latency_ms_p50": OPENVINO_MS[model],
                                        "openvino.file_bytes": 2 * size}  # fmt: skip
                        tracker.log_metrics(stage_run, metrics, step=index)
                        tracker.log_metrics(chain_run, metrics, step=index)
        tracker.log_metrics(sweep_run, {"stage_runs_executed": 5, "stage_runs_reused": 3, "sweep_seconds": 60})
    return sweep_run


def test_report_tables_and_frontiers_from_mlflow(toy_store):
    tracker, _ = toy_store
    report = build_report(tracker.read_sweep(SWEEP), SWEEP)
    table = report.orderings.set_index("ordering")
    # All three finals are on the 3-D frontier, so best first is by accuracy.
    assert report.orderings.ordering.tolist() == ["a", "a>b", "b>a"]
    assert table.loc["a>b", "delta_top1"] == pytest.approx(-2.0)
    assert table.loc["a>b", "size_ratio"] == pytest.approx(0.05)
    assert table.loc["b>a", "speedup"] == pytest.approx(4.0 / 1.3)
    assert table.pareto.all()
    assert table.loc["a>b", "stages_trained"] == 3 and table.loc["a", "stages_trained"] == 0
    # The shared baseline and prefix `a` are one model each; the baseline is dominated by `b`.
    models = report.models
    assert sorted(models.index) == ["a", "ab", "b", "ba", "base"]
    assert sorted(models.index[models.pareto]) == ["a", "ab", "b", "ba"]
    assert sorted(models.index[models.pareto_top1__artifact_bytes]) == ["ab", "b"]
    assert sorted(models.index[models.pareto_top1__latency_ms_p50]) == ["a", "ab", "b", "ba"]
    assert models.loc["ab", "path"] == "baseline>a>b"


def test_report_uses_the_first_deploy_runtime_and_keeps_torch_eager_beside_it(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_toy_sweep(tracker, openvino=True)
    runs = tracker.read_sweep(SWEEP)
    report = build_report(runs, SWEEP)
    assert report.runtime == "openvino"
    table = report.orderings.set_index("ordering")
    # In OpenVINO `b` dominates `a` (more accurate, smaller, faster): the ordering `a` leaves the frontier.
    assert sorted(report.models.index[report.models.pareto]) == ["ab", "b", "ba"]
    assert sorted(report.models.index[report.models["pareto[torch]"]]) == ["a", "ab", "b", "ba"]
    assert not table.loc["a", "pareto"] and table.loc["b>a", "pareto"]
    assert table.loc["b>a", "speedup"] == pytest.approx(1.0 / 0.35)
    assert table.loc["b>a", "torch_speedup"] == pytest.approx(4.0 / 1.3)
    md = markdown(report)
    assert "p50 ms (openvino)" in md and "torch eager p50 ms" in md and "## Pareto frontiers (openvino)" in md
    eager = build_report(runs, SWEEP, runtime="torch")
    assert eager.runtime == "torch" and sorted(eager.models.index[eager.models.pareto]) == ["a", "ab", "b", "ba"]
    # Re-measured latency is the chosen runtime's; the report says torch eager's columns are the stages' own.
    remeasured = build_report(runs, SWEEP, {m: OPENVINO_MS[m] / 2 for m in MODELS})
    assert remeasured.models.loc["ba", "openvino.latency_ms_p50"] == pytest.approx(0.175)
    assert remeasured.models.loc["ba", "latency_ms_p50"] == pytest.approx(1.3)
    remeasured_md = markdown(remeasured)
    assert "latency in openvino: batch-1 p50 on 1 thread, re-measured" in remeasured_md
    assert "torch eager's columns keep each stage's own figure" in remeasured_md
    eager_remeasured = markdown(build_report(runs, SWEEP, {m: 1.0 for m in MODELS}, "torch"))
    assert "latency in torch eager: batch-1 p50" in eager_remeasured and "keep each stage" not in eager_remeasured
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        build_report(runs, SWEEP, runtime="tflite")


def test_report_of_a_runtime_the_sweep_did_not_measure_is_an_error(toy_store):
    tracker, _ = toy_store
    with pytest.raises(ValueError, match="logged no onnxruntime metrics"):
        build_report(tracker.read_sweep(SWEEP), SWEEP, runtime="onnxruntime")


def test_report_writes_files_and_logs_them_to_the_sweep_run(toy_store, tmp_path):
    tracker, sweep_run = toy_store
    report, out = report_sweep(tracker, None, tmp_path / "reports")  # None: the latest sweep
    assert out == tmp_path / "reports" / SWEEP
    names = {
        "report.md",
        "report.html",
        "report-interactive.html",
        "orderings.csv",
        "models.csv",
        "accuracy_vs_latency.png",
        "accuracy_vs_size.png",
        "accuracy_vs_latency.svg",
        "accuracy_vs_size.svg",
    }
    assert {p.name for p in out.iterdir()} == names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| 1 | `a` | 79.00 | -1.00 |" in md
    assert "stage runs: 5 executed, 3 reused" in md
    assert "![accuracy_vs_size](accuracy_vs_size.png)" in md
    logged = {a.path for a in tracker.client.list_artifacts(sweep_run, "report")}
    assert {f"report/{n}" for n in names} == logged


def test_report_of_unknown_or_missing_sweep_is_an_error(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match="no sweep in the MLflow store yet"):
        report_sweep(tracker, None, tmp_path)
    with pytest.raises(ValueError, match="no runs with tags.sweep = 'nope'"):
        report_sweep(tracker, "nope", tmp_path)


def test_html_report_renders_in_headless_chromium(toy_store, tmp_path):
    tracker, _ = toy_store
    _, out = report_sweep(tracker, SWEEP, tmp_path / "reports")
    dom = rendered_dom(out / "report-interactive.html", tmp_path / "chromium-profile")
    # plotly.js ran in the browser: each figure drew one SVG trace and legend entry per ordering plus the frontier
    # (none of these elements is in the HTML file itself; plotly.js creates them).
    assert 'class="trace scatter' not in (out / "report-interactive.html").read_text()
    assert dom.count('class="plotly-graph-div') == 2, dom[:500]
    assert dom.count('class="trace scatter') == 2 * (len(ORDERINGS) + 1)
    legend = re.findall(r'class="legendtext"[^>]*>([^<]*)<', dom)
    assert sorted(html.unescape(t) for t in legend) == sorted([*ORDERINGS, "Pareto frontier"] * 2)
    table = dom.split('id="orderings"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") == 1 + len(ORDERINGS)


def test_mlflow_ui_lists_the_sweep_runs_with_metrics(toy_store):
    tracker, sweep_run = toy_store
    with mlflow_process("ui", "--backend-store-uri", tracker.uri) as base:
        body = {
            "experiment_ids": [tracker.experiment_id],
            "filter": f"tags.sweep = '{SWEEP}' and tags.run_type = 'chain'",
        }
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        runs = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    by_ordering = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "ordering"): r for r in runs}
    assert set(by_ordering) == set(ORDERINGS)
    for ordering, run in by_ordering.items():
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == sweep_run
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["top1"] == MODELS[ORDERINGS[ordering][-1]][0]  # the latest value: the final stage


def test_sweep_table_shows_each_runtime_latency():
    from types import SimpleNamespace

    from pipeline.reporting.summaries import sweep_table

    final = {"val_top1": 81.3, "top1": 80.1, "artifact_bytes": 1.3e6, "latency_ms_p50": 1.2,
             "onnxruntime.latency_ms_p50": 0.15, "openvino.latency_ms_p50": 0.23, "onnxruntime.top1": 80.0}  # fmt: skip
    done = SimpleNamespace(ordering="prune>qat", status="FINISHED", final=final, executed=["qat"], reused=2, error="")
    failed = SimpleNamespace(ordering="qat>prune", status="FAILED", final={}, executed=[], reused=0, error="boom")
    plan = SimpleNamespace(sweep_id="s-1", skipped=[], distinct_stages=4, stage_slots=6)
    summary = SimpleNamespace(plan=plan, run_id="r", results=[done, failed], already_done=[], executed=1, reused=2,
                              seconds=3.0)  # fmt: skip
    lines = sweep_table(summary).splitlines()
    assert re.search(r"torch p50 +ort p50 +ov p50 +trained", lines[1])
    assert lines[3].split()[2:8] == ["81.30", "80.10", "1.30", "MB", "1.20", "0.150"] and "0.230" in lines[3]
    assert "qat>prune" in lines[4] and lines[4].count("-") >= 5 and "error: boom" in lines[5]
