"""Report pictures and the self-contained HTML / Markdown pages."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from editinfinity import report


def _img(w: int = 64, h: int = 48, colour=(30, 120, 200)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def test_heat_colors_endpoints_and_order():
    c = report.heat_colors(np.array([0.0, 0.5, 1.0]))
    assert c.dtype == np.uint8 and c.shape == (3, 3)
    assert c[0].tolist() == [0, 0, 128] and c[2].tolist() == [128, 0, 0]
    assert c[0, 2] > c[0, 0] and c[2, 0] > c[2, 2]  # low = blue, high = red


def test_attention_overlay():
    image = _img()
    attn = torch.zeros(3, 4)
    attn[0, 0] = 1.0
    over = report.attention_overlay(image, attn)
    assert over.size == image.size and over.mode == "RGB"
    arr = np.asarray(over).astype(int)
    assert arr[0, 0, 0] > arr[-1, -1, 0]  # the hot corner is redder than the cold one
    # alpha 0 gives the image back; a constant map is drawn with the lowest colour.
    assert np.array_equal(np.asarray(report.attention_overlay(image, attn, alpha=0.0)), np.asarray(image))
    flat = np.asarray(report.attention_overlay(image, torch.full((3, 4), 0.2), alpha=1.0))
    assert (flat == np.array([0, 0, 128])).all()
    assert report.overlay_attention is report.attention_overlay


def test_mask_and_weights_pictures():
    mask = torch.tensor([[True, False], [False, False]])
    pic = report.mask_picture(mask, (8, 6))
    assert pic.size == (8, 6) and pic.mode == "L"
    arr = np.asarray(pic)
    assert (arr[:3, :4] == 255).all() and (arr[3:, :] == 0).all() and (arr[:, 4:] == 0).all()
    assert report.mask_picture(mask).size == (32, 32)  # 16 px per cell by default
    w = torch.tensor([[1.0, 0.0], [0.5, 0.25]])
    wp = np.asarray(report.weights_picture(w, (2, 2)))
    assert wp.tolist() == [[255, 0], [128, 64]]  # white = 1 = keep
    assert report.mask_image is report.mask_picture and report.weights_image is report.weights_picture


def test_side_by_side():
    a, b = _img(40, 20), _img(30, 40, (200, 0, 0))
    strip = report.side_by_side([("source", a), ("edited", b)], gap=4)
    # Both scaled to the tallest height (40): 80 + 30 px wide plus three gaps, a title band on top.
    assert strip.mode == "RGB" and strip.width == 80 + 30 + 3 * 4 and strip.height > 40
    arr = np.asarray(strip)
    assert (arr[strip.height - 10, 4 + 80 + 4 + 15] == [200, 0, 0]).all()
    title_band = arr[: strip.height - 40 - 4]
    assert (title_band < 128).any()  # the titles are drawn in black
    with pytest.raises(ValueError, match="empty"):
        report.side_by_side([])


def test_write_report_html_self_contained(tmp_path):
    images = {"source": _img(), "edit mask": report.mask_picture(torch.eye(4, dtype=torch.bool))}
    out = report.write_report_html(
        tmp_path / "sub" / "report.html",
        images=images,
        prompts={"source prompt": "a <cat> & a dog", "edit prompt": "a puppy on the grass"},
        settings={"mode": "auto", "seed": 0, "schedule": [[1, 1, 1], [1, 2, 2]]},
        timings={"generate": 1.234},
        metrics={"psnr": float("inf"), "ssim": 0.91234567},
    )
    text = out.read_text(encoding="utf-8")
    assert out.name == "report.html" and text.startswith("<!DOCTYPE html>")
    assert "a &lt;cat&gt; &amp; a dog" in text and "a puppy on the grass" in text
    assert "1.23 s" in text and "0.912346" in text and "inf" in text
    # No external resources: every src is an inline data URI, no links or scripts.
    srcs = re.findall(r"src='([^']*)'", text)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text and "<script" not in text and "<link" not in text
    decoded = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert decoded.size == images["source"].size
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_write_report_html_replaces_atomically(tmp_path):
    p = tmp_path / "r.html"
    p.write_text("old")
    report.write_report_html(p, images={}, prompts={"source": "x"})
    assert "old" not in p.read_text() and "<h2>Prompts</h2>" in p.read_text()


def test_markdown_summary():
    md = report.markdown_summary(prompts={"source": "a cat | a dog"}, metrics={"psnr": 27.951},
                                 settings={"mode": "mask"}, timings={"lora": 12.0},
                                 images={"edited": _img(512, 256)}, max_image_side=64)
    assert "| source | a cat \\| a dog |" in md and "| psnr | 27.951 |" in md and "12.00 s" in md
    thumb = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(thumb))).size == (64, 32)
    assert "_none_" in report.markdown_summary()


def test_to_pil_rounds_to_the_nearest_byte_and_clamps():
    """(x + 1) * 127.5 rounded to the nearest byte, not truncated as the published code does, and clamped."""
    from editinfinity.edit.generate import to_pil

    byte_values = torch.tensor([0.4, 0.6, 100.49, 100.51, 127.5 - 0.2, 254.6, 300.0, -40.0])
    img = (byte_values / 127.5 - 1).reshape(1, 1, 1, -1).expand(1, 3, 2, -1)
    out = np.asarray(to_pil(img))
    assert out.shape == (2, 8, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 100, 101, 127, 255, 255, 0]
    assert (out == out[:1, :, :1]).all()  # every channel and row alike


def test_decoded_pictures_become_bytes_in_one_place():
    """The toy model's training and judging use the edit's conversion (``to_pil``), not a copy of it: the same
    bytes for a batch, and the rounding expression written once under core/."""
    import re
    from pathlib import Path

    from editinfinity.edit.generate import to_pil
    from editinfinity.edit.pixels import to_bytes

    torch.manual_seed(0)
    batch = torch.rand(3, 3, 4, 5) * 2.4 - 1.2
    got = to_bytes(batch)
    assert got.shape == (3, 4, 5, 3) and got.dtype == np.uint8
    for i in range(3):
        assert (got[i] == np.asarray(to_pil(batch[i:i + 1]))).all()
    core = Path(__file__).resolve().parents[1] / "core" / "editinfinity"
    places = [f"{p.relative_to(core)}:{n}" for p in core.rglob("*.py")
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"\*\s*127\.5\)?\s*\.round\(\)", line)]
    assert len(places) == 1, places
