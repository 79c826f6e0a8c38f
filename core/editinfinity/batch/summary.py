"""The batch summary page: one row per case (from ``runtime.case_result``), in HTML and Markdown, with its figures;
and publishing it by URI."""

from __future__ import annotations

import html
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import _metric_name


@dataclass
class BatchReport:
    """The batch summary page in HTML and Markdown, its figures, and the per-case rows."""

    html: str
    markdown: str
    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def batch_report(results: Iterable[str]) -> BatchReport:
    """One page over every case (``case_result`` JSON strings), sorted by case id."""
    rows = sorted((json.loads(r) for r in results), key=lambda r: str(r.get("case_id", "")))
    metric_names = sorted({k for r in rows for k in r.get("metrics", {})})
    head = ["case", "mode", "prompt", "edit prompt", *metric_names, "seconds", "results"]
    body, md = [], ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spec, metrics = r.get("spec", {}), r.get("metrics", {})
        total = r.get("seconds", {}).get("total", sum(r.get("seconds", {}).values()))
        uri = r.get("output_uri", "")
        cells = [r.get("case_id", ""), spec.get("mode", ""), spec.get("prompt", ""), spec.get("edit_prompt", ""),
                 *[f"{metrics[m]:.4g}" if m in metrics else "" for m in metric_names], f"{total:.1f}",
                 f"{uri}/report.html" if uri else ""]
        link = f'<a href="{html.escape(cells[-1])}">report</a>' if uri else ""
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells[:-1]) + f"<td>{link}</td></tr>")
        md.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>EditInfinity batch</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h1>EditInfinity batch: {len(rows)} cases</h1><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table></body></html>\n")
    figures: dict[str, float] = {"cases": float(len(rows))}
    for m in metric_names:
        values = [r["metrics"][m] for r in rows if m in r.get("metrics", {})]
        figures[f"mean_{_metric_name(m)}"] = sum(values) / len(values)
    return BatchReport(html=page, markdown=f"# EditInfinity batch: {len(rows)} cases\n\n" + "\n".join(md) + "\n",
                       metrics=figures, rows=rows)


def publish_batch(output_uri: str, report: BatchReport) -> str:
    """Write ``index.html``, ``summary.md`` and ``summary.jsonl`` under ``output_uri`` ("" when none given)."""
    if not output_uri:
        return ""
    from .. import storage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "index.html").write_text(report.html)
        (root / "summary.md").write_text(report.markdown)
        (root / "summary.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in report.rows))
        for name in ("index.html", "summary.md", "summary.jsonl"):
            storage.upload(root / name, f"{output_uri.rstrip('/')}/{name}")
    return output_uri


# ---------------------------------------------------------------------------------------------------------------
# `editinfinity pipeline ...`
