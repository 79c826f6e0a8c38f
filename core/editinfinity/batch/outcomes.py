"""The outcome of every case of a batch (done, failed, invalid, not run) and the summary page over them.

It reads only the plan and the status records under ``<output_uri>/_status/``, so it can run after workers failed
or were preempted: a case whose worker never reached it is reported ``not run``.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

from .plan import BatchPlan
from .worker import case_uri, is_done, read_status

OUTCOMES = ("done", "failed", "invalid", "not run")
#: Figures of a case's metrics that are counts, not quality measures (not shown or averaged).
COUNTS = frozenset({"pixels"})


def outcomes(plan: BatchPlan) -> list[dict]:
    """One record per case of the plan, sorted by id: ``id``, ``status``, ``spec``, ``error``, ``output_uri``,
    ``seconds``, ``metrics``."""
    rows = []
    for case in plan.invalid:
        rows.append({"id": case["id"], "status": "invalid", "error": case["error"], "spec": _spec(case)})
    for case in plan.cases:
        status = read_status(plan.output_uri, case["id"])
        if status is None:
            status = {"status": "done" if is_done(plan, case) else "not run"}
        row = {"spec": _spec(case), **status, "id": case["id"]}
        if row["status"] == "done":
            row["output_uri"] = case_uri(plan, case)
        rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def _spec(case: dict) -> dict:
    return {k: case.get(k, "") for k in ("mode", "prompt", "edit_prompt", "target_word")}


def browser_link(uri: str, relative_to: str = "") -> str:
    """A link a browser (and the KFP UI's HTML viewer) can open: the console URL of a ``gs://`` / ``s3://`` object,
    else the path relative to ``relative_to`` (the page's own folder)."""
    if uri.startswith("gs://"):
        return "https://storage.cloud.google.com/" + uri[len("gs://"):]
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return f"https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={key}"
    if relative_to and uri.startswith(relative_to.rstrip("/") + "/"):
        return uri[len(relative_to.rstrip("/")) + 1:]
    return uri


@dataclass
class BatchSummary:
    html: str
    markdown: str
    counts: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def summarize_batch(plan: BatchPlan) -> BatchSummary:
    """The summary page: counts by outcome, then one row per case with its error or its report link."""
    rows = outcomes(plan)
    counts = {o: sum(r["status"] == o for r in rows) for o in OUTCOMES}
    metric_names = sorted({k for r in rows for k, v in (r.get("metrics") or {}).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COUNTS})
    head = ["case", "outcome", "mode", "edit prompt", *metric_names, "seconds", "result or error"]
    body, md = [], ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spec, metrics = r.get("spec") or {}, r.get("metrics") or {}
        seconds = (r.get("seconds") or {}).get("case")
        cells = [r["id"], r["status"], spec.get("mode", ""), spec.get("edit_prompt", ""),
                 *[f"{metrics[m]:.4g}" if m in metrics else "" for m in metric_names],
                 f"{seconds:.1f}" if isinstance(seconds, (int, float)) else ""]
        if r["status"] == "done":
            last_md = browser_link(f"{r['output_uri']}/report.html", plan.output_uri)
            last_html = f'<a href="{html.escape(last_md)}">report</a>'
        else:
            last_md = r.get("error", "")
            last_html = html.escape(last_md)
        colour = {"done": "#e6f4ea", "failed": "#fce8e6", "invalid": "#fef7e0"}.get(r["status"], "#eeeeee")
        body.append(f'<tr style="background:{colour}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                    + f"<td>{last_html}</td></tr>")
        md.append("| " + " | ".join(str(c).replace("|", "/") for c in [*cells, last_md]) + " |")
    title = (f"EditInfinity batch: {counts['done']} done, {counts['failed']} failed, {counts['invalid']} invalid"
             + (f", {counts['not run']} not run" if counts["not run"] else ""))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>EditInfinity batch</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Results under <code>{html.escape(plan.output_uri)}</code>.</p><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table></body></html>\n")
    figures = {f"cases_{o.replace(' ', '_')}": float(n) for o, n in counts.items()}
    for m in metric_names:
        values = [r["metrics"][m] for r in rows if m in (r.get("metrics") or {})]
        figures[f"mean_{m}"] = sum(values) / len(values)
    return BatchSummary(html=page, markdown=f"# {title}\n\n" + "\n".join(md) + "\n", counts=counts,
                        metrics=figures, rows=rows)


def publish_summary(plan: BatchPlan, summary: BatchSummary) -> str:
    """Write ``index.html``, ``summary.md`` and ``summary.jsonl`` under the plan's output URI."""
    from .. import storage
    from ..scratch import scratch_dir

    with scratch_dir("editinfinity-summary") as root:
        (root / "index.html").write_text(summary.html)
        (root / "summary.md").write_text(summary.markdown)
        (root / "summary.jsonl").write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                                    for r in summary.rows))
        for name in ("index.html", "summary.md", "summary.jsonl"):
            storage.upload(root / name, f"{plan.output_uri.rstrip('/')}/{name}")
    return f"{plan.output_uri.rstrip('/')}/index.html"
