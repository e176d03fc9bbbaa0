"""The sweep's answer where a user looks first: the verdict table on the sweep's MLflow run (its Description), the
same table atop report.md, the best ordering's figures as the run's metrics, a static report.html small enough for
MLflow's artifact viewer, and the pages themselves in a real browser over `mlflow ui`."""

from __future__ import annotations

import json
import re
from itertools import permutations
from pathlib import Path

import pandas as pd

from pipeline.core.formatting import format_bytes
from pipeline.reporting.sweep_report import report_sweep
from pipeline.tracking import Tracker
from tests.conftest import mlflow_process, rendered_dom
from tests.pipeline.reporting.test_report import MODELS, ORDERINGS, SWEEP, write_toy_sweep

LINK = re.compile(r"\[`([^`]+)`\]\(([^)]+)\)")


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of the verdict table (the first table) of a Markdown text, header and rule left out."""
    lines = markdown.split("\n| # |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def _chain_runs(tracker: Tracker) -> dict[str, str]:
    return {r.tags["ordering"]: r.run_id for r in tracker.chain_runs(SWEEP)}


def test_the_sweep_run_describes_the_verdict_links_each_ordering_and_logs_the_best(toy_store, tmp_path):
    tracker, sweep_run = toy_store
    report, out = report_sweep(tracker, SWEEP, tmp_path / "reports")
    note = tracker.client.get_run(sweep_run).data.tags["mlflow.note.content"]
    rows = _table_rows(note)
    orderings = pd.read_csv(out / "orderings.csv")
    # One row per ordering, in the report's order, each with the numbers of orderings.csv.
    assert [LINK.search(r[1])[1] for r in rows] == list(orderings.ordering)
    for cells, expected in zip(rows, orderings.to_dict("records"), strict=True):
        assert cells[2] == f"{expected['top1']:.2f}" and cells[3] == format_bytes(expected["artifact_bytes"])
        assert cells[4] == f"{expected['latency_ms_p50']:.2f}"
    # The most accurate ordering is marked (toy: `a`, 79.0 % of the test split, which this old-style sweep ranks on).
    best = [r for r in rows if "★" in r[1]]
    assert len(best) == 1 and "`a`" in best[0][1] and best[0][-1] == "**best**"
    # Each name opens its chain's run in the model-training view; the report opens in the artifact viewer.
    chains = _chain_runs(tracker)
    for cells in rows:
        name, link = LINK.search(cells[1]).groups()
        assert link == f"#/experiments/{tracker.experiment_id}/runs/{chains[name]}?workflowType=machine_learning"
    assert f"(#/experiments/{tracker.experiment_id}/runs/{sweep_run}/artifacts/report/report.html?" in note
    # report.md opens with the same table, without the links.
    md_rows = _table_rows((out / "report.md").read_text())
    assert [[LINK.sub(r"`\1`", c) for c in r] for r in rows] == md_rows
    # The best ordering's figures are metrics of the sweep run: the run list shows them with no set-up.
    metrics = tracker.latest_metrics(sweep_run)
    assert metrics["best.top1"] == MODELS["a"][0] and metrics["best.artifact_bytes"] == MODELS["a"][1]
    assert metrics["best.latency_ms_p50"] == MODELS["a"][2] and metrics["orderings_on_frontier"] == 3
    # The orderings as an MLflow table; reporting again replaces it (MLflow's log_table alone would append).
    report_sweep(tracker, SWEEP, tmp_path / "again")
    folder = tracker.download_artifact(sweep_run, "orderings.json", tmp_path / "dl")
    table = json.loads(Path(folder).read_text())
    assert len(table["data"]) == len(ORDERINGS) and "ordering" in table["columns"]


def _six_orderings() -> tuple[dict[str, list[str]], dict[str, tuple[float, float, float]]]:
    """Every ordering of three stages a, b, c; a model's metrics follow from the stages that made it."""
    orderings = {">".join(p): ["base", *("".join(p[: i + 1]) for i in range(3))] for p in permutations("abc")}
    models = {"base": (80.0, 20e6, 4.0)}
    for path in {m for chain in orderings.values() for m in chain[1:]}:
        spread = sum(ord(c) * (i + 1) for i, c in enumerate(path)) % 7
        models[path] = (79.0 - len(path) - 0.1 * spread, 20e6 / 2 ** len(path), 4.0 - len(path) + 0.05 * spread)
    return orderings, models


def test_report_html_is_static_and_small_and_the_interactive_page_is_beside_it(tmp_path):
    orderings, models = _six_orderings()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_toy_sweep(tracker, orderings=orderings, models=models)
    _, out = report_sweep(tracker, SWEEP, tmp_path / "reports")
    page = (out / "report.html").read_text()
    assert (out / "report.html").stat().st_size < 1_000_000  # the bound for a 6-ordering sweep
    assert "<script" not in page and page.count("<svg") == 2  # the two plots, inline: nothing else to load
    assert (out / "report-interactive.html").stat().st_size > 1_000_000  # plotly.js, inlined once
    dom = rendered_dom(out / "report.html", tmp_path / "chromium-profile")
    verdict = dom.split('<table id="verdict">', 1)[1].split("</table>", 1)[0]
    assert verdict.count("<tr>") == 1 + len(orderings)
    assert all(f"<code>{name.replace('>', '&gt;')}</code>" in verdict for name in orderings)
    assert dom.count("<svg") >= 2 and "accuracy" in dom


def test_mlflow_ui_opens_the_sweep_page_on_the_verdict_and_the_report_from_its_link(toy_store, tmp_path):
    tracker, sweep_run = toy_store
    report_sweep(tracker, SWEEP, tmp_path / "reports")
    with mlflow_process("ui", "--backend-store-uri", tracker.uri) as base:
        page = rendered_dom(f"{base}/{tracker.run_link(sweep_run)}", tmp_path / "profile")
        viewer = rendered_dom(f"{base}/{tracker.artifact_link(sweep_run, 'report/report.html')}", tmp_path / "p2")
    # The run page, as opened, shows the Description: the verdict table, every ordering, the best one marked.
    description = page.split('data-testid="note-editor-preview-content"', 1)[1].split("</table>", 1)[0]
    assert "No description" not in page
    assert all(f"<code>{name.replace('>', '&gt;')}</code>" in description for name in ORDERINGS)
    assert description.count("<tr>") == 1 + len(ORDERINGS) and "★" in description
    # The report's link opens MLflow's HTML artifact viewer on report.html.
    assert 'class="mlflow-html-iframe"' in viewer and 'src="blob:' in viewer
