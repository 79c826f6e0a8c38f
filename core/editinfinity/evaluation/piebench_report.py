"""PIE-Bench outputs: the per-case CSV, the per-type and overall table (Markdown and HTML, laid out as the
PnP-Inversion / EditInfinity tables), and one grid of before/after thumbnails per edit type.

Table values are means over the cases that have a value, scaled as the papers print them (structure distance and
LPIPS x10^3, MSE x10^4, SSIM x10^2). A column whose scorer had no weights says *n/c* (not computed), never 0.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..report import _font, side_by_side
from .piebench import EDIT_TYPES
from .piebench_metrics import COLUMNS, METRIC_KEYS

NOT_COMPUTED = "not computed"
CSV_FIELDS = ("id", "edit_type", "edit_type_name", "status", "mode", "target_word", "note", "error", "seconds",
              *METRIC_KEYS, "image_path", "edit_prompt")
#: Column groups of the papers' table: (group title, metric keys).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Structure", ("structure_distance",)),
    ("Background preservation", ("psnr", "lpips", "mse", "ssim")),
    ("CLIP similarity", ("clip_whole", "clip_edited")),
)
_ARROW = {"lower": "↓", "higher": "↑"}


@dataclass
class CaseRow:
    """One line of ``results.csv``: a case (or a malformed entry) and its scores."""

    id: str
    edit_type: int | None
    status: str  # "ok" | "failed" | "invalid entry" | "not run"
    mode: str = ""
    target_word: str = ""
    note: str = ""
    error: str = ""
    seconds: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    #: scores of each output variant (``published``: the decode, ``kept``: with kept pixels), when scored
    variant_scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    image_path: str = ""
    edit_prompt: str = ""

    def csv_dict(self, computed: Mapping[str, bool]) -> dict[str, str]:
        out = {"id": self.id, "edit_type": "" if self.edit_type is None else str(self.edit_type),
               "edit_type_name": EDIT_TYPES.get(self.edit_type, "") if self.edit_type is not None else "",
               "status": self.status, "mode": self.mode, "target_word": self.target_word, "note": self.note,
               "error": self.error, "seconds": "" if self.seconds is None else f"{self.seconds:.2f}",
               "image_path": self.image_path, "edit_prompt": self.edit_prompt}
        for key in METRIC_KEYS:
            value = self.scores.get(key)
            if not computed.get(key, True):
                out[key] = NOT_COMPUTED
            elif value is None:
                out[key] = ""
            else:
                out[key] = repr(float(value)) if math.isfinite(value) else str(float(value))
        return out


def write_csv(path: Path, rows: Sequence[CaseRow], computed: Mapping[str, bool]) -> None:
    """``results.csv``: one row per case, raw (unscaled) metric values, ``not computed`` where no weights were
    given, empty where the case has no edit."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.csv_dict(computed))
    _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class TableRow:
    label: str
    cases: int
    scored: int
    means: dict[str, float | None]


def aggregate(rows: Sequence[CaseRow], variants: Mapping[str, str] | None = None) -> list[TableRow]:
    """One row per edit type present (in type order), then ``All``: means of the scored cases' finite values
    (NaN, the undefined background of a full-frame mask, is left out as PnP-Inversion's ``"nan"`` would be).
    ``variants`` (name -> label) adds an all-cases row per output variant, from ``CaseRow.variant_scores``."""

    def summarize(label: str, subset: list[CaseRow], variant: str | None = None) -> TableRow:
        scored = [r for r in subset if r.status == "ok" and (variant is None or variant in r.variant_scores)]
        means: dict[str, float | None] = {}
        for key in METRIC_KEYS:
            got = [(r.scores if variant is None else r.variant_scores[variant]).get(key) for r in scored]
            values = [v for v in got if v is not None and not math.isnan(v)]
            means[key] = sum(values) / len(values) if values else None
        return TableRow(label=label, cases=len(subset), scored=len(scored), means=means)

    typed = [r for r in rows if r.edit_type is not None]
    out = [summarize(f"{t} {EDIT_TYPES[t]}", [r for r in typed if r.edit_type == t])
           for t in sorted({r.edit_type for r in typed})]
    out.append(summarize("All", list(rows)))
    for name, label in (variants or {}).items():
        if any(name in r.variant_scores for r in rows):
            out.append(summarize(label, list(rows), name))
    return out


def _cell(value: float | None, key: str, computed: Mapping[str, bool]) -> str:
    if not computed.get(key, True):
        return "n/c"
    if value is None:
        return "—"
    scale = next(c[2] for c in COLUMNS if c[0] == key)
    return f"{value * scale:.2f}"


def _titles() -> list[str]:
    return [f"{title} {_ARROW[better]}" for _, title, _, better in COLUMNS]


def table_markdown(table: Sequence[TableRow], computed: Mapping[str, bool], header: Sequence[str]) -> str:
    """The table in Markdown, preceded by the ``header`` lines (settings, data, protocol)."""
    lines = ["# PIE-Bench results: EditInfinity", "", *header, ""]
    cols = ["Edit type", "Cases (scored)", *_titles()]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [f"**{row.label}**" if row.label == "All" else row.label, f"{row.cases} ({row.scored})",
                 *(_cell(row.means[k], k, computed) for k in METRIC_KEYS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Column groups as in the papers: Structure | Background preservation (PSNR, LPIPS, MSE, SSIM) | "
              "CLIP similarity (whole, edited). n/c = not computed (no weights given); — = no scored case."]
    return "\n".join(lines) + "\n"


def table_html(table: Sequence[TableRow], computed: Mapping[str, bool], header: Sequence[str],
               grids: Mapping[int, str] | None = None) -> str:
    """The table as a self-contained HTML page with the papers' two-level header; ``grids`` maps edit types to
    thumbnail-grid file names (relative links)."""
    esc = html.escape
    titles = dict(zip(METRIC_KEYS, _titles(), strict=True))
    top = "".join(f'<th colspan="{len(keys)}">{esc(g)}</th>' for g, keys in GROUPS)
    sub = "".join(f"<th>{esc(titles[k])}</th>" for _, keys in GROUPS for k in keys)
    order = [k for _, keys in GROUPS for k in keys]
    body = []
    for row in table:
        style = ' style="font-weight:bold"' if row.label == "All" else ""
        cells = "".join(f"<td>{esc(_cell(row.means[k], k, computed))}</td>" for k in order)
        body.append(f"<tr{style}><td>{esc(row.label)}</td><td>{row.cases} ({row.scored})</td>{cells}</tr>")
    pictures = "".join(f'<h3>{esc(f"{t} {EDIT_TYPES[t]}")}</h3><img src="{esc(name)}" alt="type {t}">'
                       for t, name in sorted((grids or {}).items()))
    notes = "".join(f"<li>{_code(esc(line.lstrip('- ')))}</li>" for line in header if line.strip())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>PIE-Bench: EditInfinity</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 10px;text-align:center}img{max-width:100%}</style></head><body>"
            f"<h1>PIE-Bench results: EditInfinity</h1><ul>{notes}</ul><table>"
            f'<tr><th rowspan="2">Edit type</th><th rowspan="2">Cases (scored)</th>{top}</tr><tr>{sub}</tr>'
            + "".join(body) + "</table><p>n/c = not computed (no weights given); — = no scored case.</p>"
            + pictures + "</body></html>\n")


def _code(text: str) -> str:
    """Markdown `code` spans as HTML <code> (in already escaped text)."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", text)


def type_grid(title: str, pairs: Sequence[tuple[str, Image.Image, Image.Image]], *, thumb: int = 128,
              columns: int = 3, gap: int = 10) -> Image.Image:
    """A picture of ``(caption, before, after)`` thumbnail pairs, ``columns`` pairs per row, under ``title``."""
    tiles = [side_by_side([(caption, before), ("edited", after)], height=thumb) for caption, before, after in pairs]
    if not tiles:
        tiles = [Image.new("RGB", (2 * thumb, thumb), (240, 240, 240))]
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    font = _font(18)
    head = 18 + 2 * gap
    canvas = Image.new("RGB", (min(columns, len(tiles)) * (tw + gap) + gap, head + rows * (th + gap)), "white")
    ImageDraw.Draw(canvas).text((gap, gap), title, fill=(0, 0, 0), font=font)
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (gap + (i % columns) * (tw + gap), head + (i // columns) * (th + gap)))
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def computed_columns(describe: Mapping[str, Any]) -> dict[str, bool]:
    """Which metric columns have weights, from :meth:`MetricModels.describe` (``{"clip": src|None, ...}``)."""
    from .piebench_metrics import NEEDS

    return {key: need is None or describe.get(need) is not None for key, need in NEEDS.items()}
