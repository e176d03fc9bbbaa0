"""The reports' Markdown as one HTML page: headings, paragraphs, lists, tables, `code`, **bold** and [links], each image
line (`![name](file)`) replaced by what `figure(file)` returns: an inline SVG for report.html (small, static, and it
shows in MLflow's artifact viewer, whose sandboxed frame loads nothing else), an interactive plotly figure for
report-interactive.html."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path

STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}svg{max-width:100%;height:auto}"
)


def inline(text: str) -> str:
    """Markdown inline text as HTML: escaped, with `code`, **bold** and [text](url) links."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]*)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m[2])}">{m[1]}</a>', out)


def _table(rows: list[str], table_id: str | None) -> str:
    cells = [r.strip().strip("|").split("|") for r in rows if not set(r.replace("|", "").strip()) <= set("-: ")]
    body = []
    for i, row in enumerate(cells):
        tag = "th" if i == 0 else "td"
        body.append("<tr>" + "".join(f"<{tag}>{inline(c.strip())}</{tag}>" for c in row) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}>" + "".join(body) + "</table>"


def markdown_page(text: str, title: str, figure: Callable[[str], str], table_ids: dict[str, str] | None = None) -> str:
    """`text` (the report's Markdown) as a self-contained HTML page; `table_ids` names the table that follows a
    heading (heading text -> id), for tests and links."""
    body: list[str] = []
    table: list[str] = []
    heading = ""
    ids = table_ids or {}

    def flush() -> None:
        if table:
            body.append(_table(table, ids.get(heading)))
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("!["):
            body.append(figure(line[line.index("(") + 1 : line.rindex(")")]))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            heading = line.lstrip("#").strip()
            body.append(f"<h{level}>{inline(heading)}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    head = f"<head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>"


def inline_svg(svg_text: str) -> str:
    """An SVG file's text for embedding in HTML (its XML prologue and DOCTYPE dropped)."""
    start = svg_text.find("<svg")
    return f"<figure>{svg_text[start:]}</figure>" if start >= 0 else ""


def svg_beside(out_dir: Path) -> Callable[[str], str]:
    """`markdown_page`'s `figure` for report.html: each PNG the Markdown names, inlined as the SVG drawn beside it."""
    return lambda png: inline_svg((out_dir / png).with_suffix(".svg").read_text())
