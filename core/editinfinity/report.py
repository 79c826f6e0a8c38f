"""Pictures and pages for people: attention overlays, mask and weight pictures, before/after strips, one HTML file.

Conventions: mask pictures show the edit region in white; weight pictures show ``W`` in grey levels with white = 1 =
keep the source. Picture sizes are PIL's ``(width, height)``. The HTML report is a single self-contained file (images
embedded as base64 PNG, no external assets), written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "heat_colors",
    "attention_overlay",
    "mask_picture",
    "weights_picture",
    "side_by_side",
    "png_base64",
    "write_report_html",
    "markdown_summary",
    "overlay_attention",
    "mask_image",
    "weights_image",
]

# Piecewise-linear "jet"-like heat map: dark blue (low) -> cyan -> yellow -> dark red (high).
_HEAT_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_HEAT_RGB = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=float)


def _grid_array(x, name: str) -> np.ndarray:
    a = x.detach().cpu().to(torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D grid, got shape {a.shape}")
    return a


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` to ``uint8`` RGB heat colours (shape ``values.shape + (3,)``)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def _cell_size(grid_hw: tuple[int, int], size) -> tuple[int, int]:
    if size is None:
        return grid_hw[1] * 16, grid_hw[0] * 16  # one latent cell = 16 px
    w, h = (int(v) for v in size)
    return w, h


def attention_overlay(image: Image.Image, attn, *, alpha: float = 0.5) -> Image.Image:
    """The attention map, min-max normalised, bilinearly upsampled to the image and blended over it as heat colours.

    A constant map carries no information and is shown as the lowest colour.
    """
    a = _grid_array(attn, "attn")
    lo, hi = float(a.min()), float(a.max())
    norm = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    w, h = image.size
    up = F.interpolate(torch.from_numpy(norm)[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = heat_colors(up.numpy()).astype(np.float64)
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.rint((1 - alpha) * base + alpha * heat).astype(np.uint8))


def mask_picture(edit_mask, size=None) -> Image.Image:
    """Edit mask as a crisp black-and-white picture (white = edit), each cell a block (nearest-neighbour)."""
    m = _grid_array(edit_mask, "edit_mask") > 0.5
    pic = Image.fromarray(np.where(m, 255, 0).astype(np.uint8))
    return pic.resize(_cell_size(m.shape, size), resample=Image.NEAREST)


def weights_picture(weights, size=None) -> Image.Image:
    """Keep weights ``W`` as grey levels (white = 1 = keep the source, black = 0 = generated), one block per cell."""
    w = np.clip(_grid_array(weights, "weights"), 0.0, 1.0)
    pic = Image.fromarray(np.rint(w * 255).astype(np.uint8))
    return pic.resize(_cell_size(w.shape, size), resample=Image.NEAREST)


def side_by_side(images: Sequence[tuple[str, Image.Image]], *, height: int | None = None, gap: int = 8,
                 background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Pictures in a row at a common height (default: the tallest), each with its title drawn above it."""
    if not images:
        raise ValueError("`images` is empty: give at least one (title, picture) pair")
    target_h = int(height or max(im.height for _, im in images))
    scaled = [(t, im.convert("RGB").resize((max(1, round(im.width * target_h / im.height)), target_h),
                                           resample=Image.LANCZOS) if im.height != target_h else im.convert("RGB"))
              for t, im in images]
    font = _font(max(12, min(24, target_h // 16)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t, _ in scaled)
    title_h = text_h + 2 * gap
    total_w = sum(im.width for _, im in scaled) + gap * (len(scaled) + 1)
    canvas = Image.new("RGB", (total_w, title_h + target_h + gap), background)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for title, im in scaled:
        tw = draw.textbbox((0, 0), title, font=font)[2]
        draw.text((x + max(0, (im.width - tw) // 2), gap), title, fill=(0, 0, 0), font=font)
        canvas.paste(im, (x, title_h))
        x += im.width + gap
    return canvas


def _font(size: int):
    """PIL's bundled font at ``size`` px (FreeType build), else its small bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def png_base64(image: Image.Image) -> str:
    """The picture as a base64-encoded PNG (ASCII)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _table_html(rows: Mapping | None) -> str:
    if not rows:
        return "<p class='none'>none</p>"
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}th,td{text-align:left;padding:.25em .8em;border-bottom:1px solid #eee;vertical-align:top}
th{font-weight:600;white-space:nowrap}.prompt{font-family:ui-monospace,Menlo,monospace}
.gallery{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.9em;color:#555;margin-top:.3em}
img{max-width:100%;image-rendering:auto;border:1px solid #ddd}.none{color:#888}
"""


def write_report_html(path, *, images: Mapping[str, Image.Image], prompts: Mapping[str, str] | None = None,
                      settings: Mapping | None = None, timings: Mapping | None = None,
                      metrics: Mapping | None = None, title: str = "EditInfinity edit report") -> Path:
    """Write one self-contained HTML page (pictures inlined as base64 PNG) atomically; returns its path.

    Args:
        path: output file.
        images: title -> picture, shown in order.
        prompts: label -> text (source prompt, edit prompt, target word ...).
        settings: label -> value (mode, resolution, seed, iterations ...).
        timings: stage -> seconds.
        metrics: name -> value.
    """
    out = Path(path)
    figures = "".join(
        f"<figure><img alt='{html.escape(t, quote=True)}' src='data:image/png;base64,{png_base64(im)}'>"
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, im in images.items()
    )
    prompt_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='prompt'>{html.escape(str(v))}</td></tr>"
                          for k, v in (prompts or {}).items())
    timing_rows = {k: (f"{v:.2f} s" if isinstance(v, (int, float)) else v) for k, v in (timings or {}).items()}
    doc = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<h2>Prompts</h2>{f'<table>{prompt_rows}</table>' if prompt_rows else _table_html(None)}"
        f"<h2>Pictures</h2><div class='gallery'>{figures}</div>"
        f"<h2>Metrics</h2>{_table_html(metrics)}"
        f"<h2>Settings</h2>{_table_html(settings)}"
        f"<h2>Timings</h2>{_table_html(timing_rows)}"
        "</body></html>\n"
    )
    return atomic_write_text(out, doc)


def atomic_write_text(out: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``out`` through a temporary file in the same folder, with the mode the user's
    umask asks for; returns ``out``."""
    from .storage.base import _atomic_write

    _atomic_write(Path(out), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out


def _md_cell(value) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: Mapping | None, header: tuple[str, str]) -> str:
    if not rows:
        return "_none_\n"
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def markdown_summary(*, prompts: Mapping[str, str] | None = None, settings: Mapping | None = None,
                     timings: Mapping | None = None, metrics: Mapping | None = None,
                     images: Mapping[str, Image.Image] | None = None, max_image_side: int = 256,
                     title: str = "EditInfinity edit") -> str:
    """A Markdown summary for the Kubeflow Pipelines UI (Markdown visualisation).

    Pictures, when given, are inlined as small base64 PNG thumbnails (longest side ``max_image_side``) so the
    artifact stays self-contained.
    """
    parts = [f"# {title}\n", "## Prompts\n", _md_table(prompts, ("", "text")), "## Metrics\n",
             _md_table(metrics, ("metric", "value")), "## Settings\n", _md_table(settings, ("setting", "value")),
             "## Timings\n", _md_table({k: (f"{v:.2f} s" if isinstance(v, (int, float)) else v)
                                        for k, v in (timings or {}).items()}, ("stage", "time"))]
    if images:
        parts.append("## Pictures\n")
        for t, im in images.items():
            thumb = im.convert("RGB")
            thumb.thumbnail((max_image_side, max_image_side))
            parts.append(f"**{_md_cell(t)}**\n\n![{_md_cell(t)}](data:image/png;base64,{png_base64(thumb)})\n")
    return "\n".join(parts)


# Names used in docs/internal-api.md.
overlay_attention = attention_overlay
mask_image = mask_picture
weights_image = weights_picture
