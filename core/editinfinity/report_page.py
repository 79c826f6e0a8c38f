"""The edit's report page: one self-contained HTML file a person reads at a glance (``report.html``).

Top to bottom: the prompts; a warning when the preset cannot represent the picture (``edit.representation``); a
before/after slider (source under, edit over, a range input moves the cut; without scripts the cut is dragged by
its corner) and a three-way toggle (source / edit / reconstruction, CSS only); where the edit happened, drawn over
the source and over the edit (edit mask in red with its outline, the keep-weight band in yellow, the attention of the
target word as heat colours) and the per-pixel keep weight; the numbers with their units; a bar of the time each
stage took; settings, case and versions folded away in ``<details>``. Every picture is an inline PNG data URI, so the
file can be mailed, published, or shown by the Kubeflow Pipelines UI as an HTML artifact.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .edit.sequence import NOT_STAGES, STAGES  # the timing keys of summary["seconds"], in run order
from .report import _fmt, atomic_write_text, attention_overlay, png_base64

__all__ = ["region_overlay", "write_edit_report", "timing_bar_html"]

EDIT_RGB = np.array([230, 40, 40], dtype=np.float64)
BAND_RGB = np.array([250, 210, 0], dtype=np.float64)
STAGE_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f", "#bab0ac")


def _nearest(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(grid.float()[None, None], size=size, mode="nearest")[0, 0].numpy()


def region_overlay(image: Image.Image, edit_mask: torch.Tensor | None, weights: torch.Tensor | None) -> Image.Image:
    """``image`` with the edit mask tinted red (and outlined) and the keep-weight band ``0 < Wp < 1`` (the pixels
    where kept source pixels and the decoded edit are mixed, ``edit.pixels``) tinted yellow."""
    from .edit.pixels import pixel_keep_weights

    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    size = (image.height, image.width)
    out = base.copy()
    if weights is not None:
        wp = pixel_keep_weights(weights, size).numpy()
        band = ((wp > 0) & (wp < 1))[..., None]
        out = np.where(band, 0.55 * out + 0.45 * BAND_RGB, out)
    if edit_mask is not None:
        m = _nearest(edit_mask, size) > 0.5
        out = np.where(m[..., None], 0.55 * out + 0.45 * EDIT_RGB, out)
        pic = Image.fromarray((m * 255).astype(np.uint8))
        edge = (np.asarray(pic.filter(ImageFilter.MaxFilter(3))) > 0) & ~m
        out[edge] = EDIT_RGB
    return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8))


def _keep_weight_picture(weights: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    from .edit.pixels import pixel_keep_weights

    wp = pixel_keep_weights(weights, size).numpy()
    return Image.fromarray(np.rint(wp * 255).astype(np.uint8)).convert("RGB")


def _img(picture: Image.Image, alt: str, cls: str = "") -> str:
    c = f" class='{cls}'" if cls else ""
    return (f"<img{c} alt='{html.escape(alt, quote=True)}' width='{picture.width}' height='{picture.height}' "
            f"src='data:image/png;base64,{png_base64(picture)}'>")


def _figure(picture: Image.Image, caption: str) -> str:
    return f"<figure>{_img(picture, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def timing_bar_html(seconds: Mapping[str, float]) -> str:
    """A horizontal bar split by the time of each stage, with a legend in seconds (``NOT_STAGES`` left out)."""
    stages = {k: float(v) for k, v in seconds.items()
              if k not in NOT_STAGES and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0}
    rank = {name: i for i, name in enumerate(STAGES)}
    stages = dict(sorted(stages.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    total = sum(stages.values())
    if not stages or total <= 0:
        return "<p class='none'>no timings recorded</p>"
    parts, legend = [], []
    for i, (name, sec) in enumerate(stages.items()):
        colour = STAGE_COLOURS[i % len(STAGE_COLOURS)]
        label = f"{name.replace('_', ' ')}: {sec:.2f} s ({100 * sec / total:.0f} %)"
        parts.append(f"<span class='seg' style='flex-grow:{sec:.6f};background:{colour}' "
                     f"title='{html.escape(label, quote=True)}'></span>")
        legend.append(f"<li><span class='sw' style='background:{colour}'></span>{html.escape(label)}</li>")
    return (f"<div class='bar' role='img' aria-label='time per stage'>{''.join(parts)}</div>"
            f"<ul class='legend'>{''.join(legend)}</ul><p>all stages: {total:.2f} s</p>")


def _db(value) -> str:
    if value is None:
        return "-"
    return "identical (inf dB)" if isinstance(value, float) and math.isinf(value) else f"{value:.2f} dB"


def _numbers_html(summary: Mapping) -> str:
    m, rep = summary.get("metrics") or {}, summary.get("representation") or {}
    cols = [("source_", "edit vs source")] if "source_psnr" in m else []
    cols.append(("", "edit vs reconstruction"))
    head = "".join(f"<th>{html.escape(c)}</th>" for _, c in cols)
    rows = [("PSNR", lambda p: _db(m.get(f"{p}psnr"))), ("SSIM", lambda p: _fmt(m.get(f"{p}ssim"))),
            ("MSE (pixel values in [0, 1])", lambda p: _fmt(m.get(f"{p}mse")))]
    body = "".join(f"<tr><th>{name}</th>" + "".join(f"<td>{html.escape(get(p))}</td>" for p, _ in cols) + "</tr>"
                   for name, get in rows)
    region = html.escape(str(m.get("region", "")))
    if "pixels" in m:
        region += f", {int(m['pixels'])} pixels"
    floor = rep.get("min_psnr_db")
    recon = _db(rep.get("reconstruction_psnr_db")) + (f" (this preset reaches at least {floor:.1f} dB on its own kind "
                                                      "of picture)" if floor else "")
    kept = "on" if summary.get("keep_pixels") else "off (the output is the decode, as the published method)"
    return (f"<p>Where nothing was to change: {region}.</p><table class='numbers'><tr><th></th>{head}</tr>{body}"
            "</table><table class='numbers'>"
            f"<tr><th>reconstruction of the source (decode of its own codes), PSNR</th><td>{html.escape(recon)}</td></tr>"
            f"<tr><th>reconstruction SSIM</th><td>{html.escape(_fmt(rep.get('reconstruction_ssim')))}"
            + (f" (at least {rep['min_ssim']:.2f} on its own kind of picture)" if rep.get("min_ssim") else "")
            + "</td></tr>"
            f"<tr><th>kept source pixels</th><td>{html.escape(kept)}</td></tr>"
            + _band_row(summary.get("band")) + "</table>")


def _band_row(band: Mapping | None) -> str:
    """The band ``band="auto"`` kept, with each candidate's score (edit.likelihood), or nothing."""
    if not band:
        return ""
    scores = ", ".join(f"{name} {c['contrast']:+.4f}" for name, c in band["candidates"].items())
    return (f"<tr><th>smoothing band (auto)</th><td>{html.escape(band['chosen'])}: the candidate the model finds "
            f"closest to the edit prompt (edit minus source bit cross-entropy: {html.escape(scores)})</td></tr>")


def _settings_value(key: str, value) -> str:
    if value is None:
        return "not set: the preset's value" if key == "lr" else "not set (default)"
    return _fmt(value)


def _details(title: str, rows: Mapping | None) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_settings_value(str(k), v))}</td></tr>"
                   for k, v in (rows or {}).items())
    return f"<details><summary>{html.escape(title)}</summary><table>{body or '<tr><td>none</td></tr>'}</table></details>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.6em;
border-bottom:1px solid #ddd}.prompts{font-family:ui-monospace,Menlo,monospace;font-size:.95em}.arrow{color:#888}
.warn{background:#fff3cd;border:1px solid #e0b000;border-left:6px solid #e08000;padding:.7em 1em;margin:1em 0}
table{border-collapse:collapse}th,td{text-align:left;padding:.25em .8em;border-bottom:1px solid #eee;vertical-align:top}
th{font-weight:600}.none{color:#888}img{display:block;border:1px solid #ccc}
.cmp{position:relative;display:inline-block;line-height:0}.cmp img{width:var(--w);height:auto;max-width:none}
.cmp .top{position:absolute;top:0;left:0;bottom:0;width:50%;overflow:hidden;resize:horizontal;min-width:4px;
max-width:100%;border-right:2px solid #fff;box-shadow:1px 0 0 #000}
.cmp .top img{border-right:none}#cut{width:var(--w);display:block;margin:.4em 0}
.toggle input{position:absolute;opacity:0}.toggle label{display:inline-block;padding:.25em .8em;border:1px solid #aaa;
border-radius:3px;cursor:pointer;margin:0 .3em .5em 0}.toggle input:checked+label{background:#333;color:#fff}
.toggle .pics img{display:none;width:var(--w);height:auto}#t-src:checked~.pics .p-src,#t-edit:checked~.pics .p-edit,
#t-rec:checked~.pics .p-rec{display:block}.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
figure{margin:0}figure img{width:var(--f);height:auto}figcaption{font-size:.85em;color:#555;margin-top:.3em;
max-width:var(--f)}.key span{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin:0 .3em 0 1em}
.bar{display:flex;height:1.6em;border:1px solid #999;max-width:800px}.seg{display:block;min-width:1px}
.legend{list-style:none;padding:0;columns:2;max-width:800px}.legend li{margin:.15em 0}
.sw{display:inline-block;width:.9em;height:.9em;margin-right:.4em;vertical-align:middle}
details{margin:.5em 0}.numbers{margin-bottom:.6em}summary{cursor:pointer;font-weight:600}
"""

_SCRIPT = """<script>
(function(){var r=document.getElementById('cut'),t=document.querySelector('.cmp .top');
if(!r||!t)return;function f(){t.style.width=r.value+'%';}r.addEventListener('input',f);f();})();
</script>"""


def write_edit_report(path, *, source: Image.Image, edited: Image.Image, reconstruction: Image.Image,
                      summary: Mapping, edit_mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                      attention: torch.Tensor | None = None, title: str = "EditInfinity edit") -> Path:
    """Write the report page for one edit (module docstring) atomically; returns its path.

    ``summary`` is the edit's ``summary.json`` content (spec, metrics, representation, seconds, settings, ...);
    ``edit_mask`` / ``weights`` / ``attention`` are the last-grid tensors of the mask and attention stages.
    """
    spec = summary.get("spec") or {}
    width = max(256, min(480, 2 * source.width))
    fig = max(200, min(320, source.width))
    target = spec.get("target_word") or ""
    warning = (summary.get("representation") or {}).get("warning")
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p class='prompts'>" + html.escape(spec.get("prompt") or "") + " <span class='arrow'>&rarr;</span> "
             + html.escape(spec.get("edit_prompt") or "") + "</p>",
             f"<p>mode <b>{html.escape(str(spec.get('mode', '')))}</b>"
             + (f", target word <b>{html.escape(target)}</b>" if target else "")
             + f", preset <b>{html.escape(str(summary.get('preset', '')))}</b>, "
             f"{source.width}&times;{source.height} px</p>"]
    if warning:
        parts.append(f"<div class='warn' role='alert'><b>Warning:</b> {html.escape(warning)}</div>")
    parts.append("<h2>Before / after</h2><p>Left: drag the slider (or the corner of the edit); left of the cut is "
                 "the edit, right of it the source. Right: switch between the pictures.</p><div class='row'><div>"
                 f"<div class='cmp' style='--w:{width}px'>{_img(source, 'source', 'under')}"
                 f"<div class='top'>{_img(edited, 'edit')}</div></div>"
                 f"<input id='cut' type='range' min='0' max='100' value='50' style='--w:{width}px' "
                 "aria-label='position of the cut between edit and source'></div>")
    parts.append(f"<div class='toggle' style='--w:{width}px'>"
                 "<input type='radio' name='t' id='t-src'><label for='t-src'>source</label>"
                 "<input type='radio' name='t' id='t-edit' checked><label for='t-edit'>edit</label>"
                 "<input type='radio' name='t' id='t-rec'><label for='t-rec'>reconstruction</label>"
                 f"<div class='pics'>{_img(source, 'source', 'p-src')}{_img(edited, 'edit', 'p-edit')}"
                 f"{_img(reconstruction, 'reconstruction (decode of the source codes)', 'p-rec')}</div></div></div>")
    if edit_mask is not None or attention is not None:
        figures = []
        if edit_mask is not None:
            figures.append(_figure(region_overlay(source, edit_mask, weights), "edit region on the source"))
            figures.append(_figure(region_overlay(edited, edit_mask, weights), "edit region on the edit"))
        if attention is not None:
            figures.append(_figure(attention_overlay(source, attention), f"attention of '{target}' on the source"))
            figures.append(_figure(attention_overlay(edited, attention), f"attention of '{target}' on the edit"))
        if weights is not None:
            figures.append(_figure(_keep_weight_picture(weights, (source.height, source.width)),
                                   "keep weight per pixel (white = source pixel kept, black = edit)"))
        parts.append("<h2>Where the edit happened</h2><p class='key'>"
                     "<span style='background:rgb(230,40,40)'></span>edit mask (outlined)"
                     "<span style='background:rgb(250,210,0)'></span>keep-weight band: source and edit mixed"
                     + ("<span style='background:linear-gradient(90deg,#00f,#0ff,#ff0,#f00)'></span>attention, low "
                        "to high" if attention is not None else "") + "</p>"
                     f"<div class='row' style='--f:{fig}px'>{''.join(figures)}</div>")
    parts.append(f"<h2>Numbers</h2>{_numbers_html(summary)}")
    parts.append(f"<h2>Time per stage</h2>{timing_bar_html(summary.get('seconds') or {})}")
    parts.append("<h2>Details</h2>" + _details("Settings", summary.get("settings"))
                 + _details("Case", {**spec, "schedule": summary.get("schedule"), "run_id": summary.get("run_id")})
                 + _details("Models and versions", {**(summary.get("models") or {}), **(summary.get("versions") or {})}))
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           + "".join(parts) + _SCRIPT + "</body></html>\n")
    return atomic_write_text(Path(path), doc)
