"""Saying when the preset cannot represent the picture: the check, its floors, and the warning in the CLI, the
summary and the report."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
from PIL import Image, ImageFilter

from editinfinity.cli import main
from editinfinity.demo import example_dir
from editinfinity.edit.representation import representation_check
from editinfinity.models import presets


def _textured(seed: int = 0, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_the_toy_preset_has_calibrated_floors():
    toy = presets.PRESETS["toy"]
    assert toy.min_reconstruction_psnr_db is not None and toy.min_reconstruction_ssim is not None
    assert 0 < toy.min_reconstruction_ssim < 1
    assert presets.PRESETS["tiny"].min_reconstruction_psnr_db is None  # random weights: no claim


def test_check_passes_a_faithful_reconstruction_and_warns_on_blobs():
    toy = presets.PRESETS["toy"]
    source = _textured()
    near = Image.fromarray(np.clip(np.asarray(source, np.int16) + 1, 0, 255).astype(np.uint8))
    ok = representation_check(source, near, "toy")
    assert ok["representable"] is True and ok["warning"] is None
    assert ok["reconstruction_psnr_db"] > toy.min_reconstruction_psnr_db
    assert ok["min_psnr_db"] == toy.min_reconstruction_psnr_db and ok["min_ssim"] == toy.min_reconstruction_ssim
    blobs = source.filter(ImageFilter.GaussianBlur(6))
    bad = representation_check(source, blobs, "toy")
    assert bad["representable"] is False
    warning = bad["warning"]
    assert "cannot represent this image" in warning and "editinfinity convert" in warning
    assert "--preset 2b --weights" in warning and "\n" not in warning
    none = representation_check(source, blobs, "tiny")
    assert none["representable"] is None and none["warning"] is None


def test_ssim_catches_what_psnr_misses():
    """A smooth picture whose reconstruction loses its fine texture keeps a high PSNR; the SSIM floor still warns."""
    rng = np.random.default_rng(1)
    base = np.full((128, 128, 3), 128.0) + rng.normal(0, 6, (128, 128, 3))
    source = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    flat = Image.new("RGB", source.size, (128, 128, 128))
    toy = presets.PRESETS["toy"]
    check = representation_check(source, flat, "toy")
    assert check["reconstruction_psnr_db"] > toy.min_reconstruction_psnr_db  # PSNR alone would accept it
    assert check["reconstruction_ssim"] < toy.min_reconstruction_ssim and check["representable"] is False


def test_warning_in_the_cli_summary_and_report(tmp_path, monkeypatch, caplog):
    """With a floor no picture reaches (set on the tiny preset for the test), the edit says so in one log line, in
    summary.json and in report.html, and still writes its outputs."""
    tiny = presets.PRESETS["tiny"]
    monkeypatch.setitem(presets.PRESETS, "tiny", dataclasses.replace(tiny, min_reconstruction_psnr_db=200.0))
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["edit", "--image", str(ex / case["image"]), "--prompt", case["prompt"], "--edit-prompt",
                     case["edit_prompt"], "--whole-image", "--out", str(out), "--preset", "tiny",
                     "--prompt-iters", "1", "--lora-iters", "1", "-q"]) == 0
    lines = [r.getMessage() for r in caplog.records if "cannot represent" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    rep = summary["representation"]
    assert rep["representable"] is False and rep["warning"] == lines[0] and rep["min_psnr_db"] == 200.0
    assert rep["reconstruction_psnr_db"] < 200.0
    html = (out / "report.html").read_text()
    assert "role='alert'" in html and "cannot represent this image" in html
    assert (out / "edited.png").is_file()
