"""The edit's report page: self-contained, the pieces a reader needs, and it renders in headless Chromium (images
load, the screenshot is not blank)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from editinfinity.report_page import region_overlay, timing_bar_html, write_edit_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
WARNING = "the toy preset cannot represent this image: do something else"


def _scene(colour, seed: int = 0, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    arr = np.stack([120 + 100 * x, 90 + 80 * y, 160 - 60 * x * y], axis=-1) + rng.normal(0, 3, (size, size, 3))
    arr[40:90, 60:110] = colour
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> dict:
    source, edited, recon = _scene((220, 40, 40)), _scene((40, 200, 60)), _scene((200, 60, 50), seed=1)
    grid = (8, 8)
    edit_mask = torch.zeros(grid, dtype=torch.bool)
    edit_mask[3:6, 4:7] = True
    weights = torch.ones(grid)
    weights[2:7, 3:8] = 0.5
    weights[3:6, 4:7] = 0.0
    attention = torch.rand(grid, generator=torch.Generator().manual_seed(0))
    summary = {
        "spec": {"prompt": "a red <square>", "edit_prompt": "a green square & more", "mode": "auto",
                 "target_word": "square"},
        "preset": "toy", "keep_pixels": True, "schedule": [[1, 1, 1], [1, 8, 8]], "run_id": "abc",
        "metrics": {"region": "background (keep weight 1)", "pixels": 9000, "psnr": 31.5, "mse": 0.0007,
                    "ssim": 0.93, "source_psnr": float("inf"), "source_mse": 0.0, "source_ssim": 1.0},
        "representation": {"reconstruction_psnr_db": 17.25, "reconstruction_ssim": 0.41, "min_psnr_db": 24.0,
                           "representable": False, "warning": WARNING},
        "seconds": {"prepare": 1.5, "tune_prompt": 3.0, "train_lora": 9.0, "attention": 0.5, "mask": 0.01,
                    "generate": 2.0, "total": 16.01},
        "settings": {"lr": None, "seed": 0, "keep_pixels": True, "band": "auto"},
        "band": {"chosen": "reference", "candidates": {"scaled": {"contrast": -0.0125}, "reference": {"contrast": -0.25}}},
        "versions": {"editinfinity": "test"},
    }
    path = write_edit_report(tmp_path_factory.mktemp("report") / "report.html", source=source, edited=edited,
                             reconstruction=recon, edit_mask=edit_mask, weights=weights, attention=attention,
                             summary=summary)
    return {"path": path, "text": path.read_text(encoding="utf-8"), "source": source, "summary": summary}


def test_report_is_self_contained_and_says_what_a_reader_needs(page):
    text = page["text"]
    srcs = re.findall(r"src='([^']*)'", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text and "<link" not in text
    first = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert first.size == page["source"].size
    assert "a red &lt;square&gt;" in text and "a green square &amp; more" in text  # escaped
    assert WARNING in text and "role='alert'" in text
    assert "type='range'" in text and "name='t'" in text  # slider and toggle
    assert "31.50 dB" in text and "inf dB" in text and "17.25 dB" in text and "24.0 dB" in text  # units
    assert re.search(r"<details><summary>Settings</summary>.*<th>lr</th><td>not set: the preset", text)
    assert "lr</th><td>None" not in text
    assert "smoothing band (auto)</th><td>reference:" in text and "scaled -0.0125, reference -0.2500" in text
    for caption in ("edit region on the source", "edit region on the edit", "attention of &#x27;square&#x27; on the "
                    "source", "attention of &#x27;square&#x27; on the edit", "keep weight per pixel"):
        assert caption in text
    assert [p.name for p in page["path"].parent.iterdir()] == ["report.html"]  # atomic: no temporary file left


def test_timing_bar_has_one_segment_per_stage_in_proportion():
    bar = timing_bar_html({"generate": 2.0, "prepare": 1.0, "total": 3.0, "peak_gpu_memory_gb": 4.0})
    grows = [float(g) for g in re.findall(r"flex-grow:([0-9.]+)", bar)]
    assert grows == [1.0, 2.0]  # prepare before generate; total and memory are not stages
    assert "33 %" in bar and "67 %" in bar and "all stages: 3.00 s" in bar
    assert "no timings" in timing_bar_html({})


def test_region_overlay_tints_the_mask_and_the_band():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    weights = torch.ones(4, 4)
    weights[1:3, 1:3] = 0.0
    arr = np.asarray(region_overlay(image, mask, weights)).astype(int)
    assert arr[32, 32, 0] > 150 and arr[32, 32, 1] < 110  # inside the mask: red
    assert (arr[2, 2] == 128).all()  # far away: untouched
    band = arr[10, 32]  # between a kept cell and the mask: mixed weights, yellow tint
    assert band[0] > 150 and band[1] > 150 and band[2] < 110
    assert np.array_equal(np.asarray(region_overlay(image, None, None)), np.asarray(image))


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") or os.environ.get("EDITINFINITY_REQUIRE_CHROMIUM"):
            pytest.fail("headless Chromium is required in CI (.ci/run installs Debian's `chromium` package)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it and runs this test")
    return exe


_PROBE = """<script>window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify(imgs.map(function (i) { return [i.complete, i.naturalWidth, i.naturalHeight]; }));
  document.body.appendChild(out);
});</script>"""


def test_report_renders_in_headless_chromium(page, tmp_path):
    exe = _chromium()
    probed = tmp_path / "probed.html"
    probed.write_text(page["text"].replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    common = [exe, *CHROMIUM_FLAGS, "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom.stdout, re.S)
    assert match, f"the page did not finish loading: {dom.stderr[-2000:]}"
    images = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(images) == page["text"].count("<img ") and len(images) >= 9
    assert all(done and w > 0 and h > 0 for done, w, h in images), images
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1100,1400",
                    f"--screenshot={shot}", page["path"].as_uri()], capture_output=True, timeout=120)
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert arr.shape[0] >= 1000 and arr.std() > 20, "the screenshot is blank"
    # the pictures are on screen: the source's red square and the edit's green one both appear
    red = (arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    green = (arr[..., 1] > 160) & (arr[..., 0] < 80) & (arr[..., 2] < 100)
    assert red.sum() > 500 and green.sum() > 500
