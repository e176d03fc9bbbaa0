"""The sensitivity report: the ranked console table, one CSV row per cell, the PNG and the offline HTML heatmap."""

from __future__ import annotations

import csv

from pipeline.reporting.sensitivity import CSV_FIELDS, ranked_table, write_report
from pipeline.sensitivity.analysis import Cell, LayerInfo, SensitivityResult
from pipeline.sensitivity.config import SensitivityConfig


def _result() -> SensitivityResult:
    layers = [LayerInfo("stem", "Conv2d 8x3x3x3", 216, 1000, 864, 0.4), LayerInfo("fc", "Linear 4x8", 36, 32, 128, 0.1)]
    cells = [
        Cell("stem", "prune", 0.5, 70.0, 10.0, 100, 500, 400, ("block.conv",), 0.1),
        Cell("stem", "inq", 4.0, 79.0, 1.0, 0, 0, 756, (), 0.1),
        Cell("fc", "inq", 4.0, 50.0, 30.0, 0, 0, 112, (), 0.1),
    ]
    return SensitivityResult("tiny (baseline)", "key", 100, 80.0, layers, cells, SensitivityConfig(),
                             labels=["prune 50%", "inq 4b"])  # fmt: skip


def test_the_table_ranks_by_the_largest_drop_and_marks_what_does_not_apply():
    lines = ranked_table(_result()).splitlines()
    assert "unchanged 80.00% on 100 images" in lines[0]
    rows = lines[3:]
    assert rows[0].split()[0] == "fc" and rows[1].split()[0] == "stem"
    assert rows[0].split()[3] == "-"  # the classifier is not pruned
    assert rows[0].split()[-1] == "30.00" and rows[1].split()[3] == "10.00"


def test_the_report_files(tmp_path):
    files = write_report(_result(), tmp_path / "out")
    with files["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 3
    assert rows[0]["label"] == "prune 50%" and rows[0]["coupled"] == "block.conv" and float(rows[2]["drop"]) == 30
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["html"].read_text()
    assert "plotly" in html and "also prunes: block.conv" in html and "<script src=" not in html  # offline
    assert (tmp_path / "out" / "sensitivity.txt").read_text().startswith("sensitivity of tiny")


def test_measured_latency_shares_get_a_column_in_the_table_and_the_csv(tmp_path):
    from dataclasses import replace

    result = _result()
    result.layers = [replace(result.layers[0], latency_share=0.625), replace(result.layers[1], latency_share=0.05)]
    lines = ranked_table(result).splitlines()
    assert "ORT %" in lines[1] and "share of the batch-1 ONNX Runtime forward" in lines[0]
    assert lines[4].split()[:4] == ["stem", "0.2k", "40.0", "62.5"]
    files = write_report(result, tmp_path / "out")
    with files["csv"].open() as f:
        assert {float(r["latency_share"]) for r in csv.DictReader(f)} == {0.625, 0.05}
