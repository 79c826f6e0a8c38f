"""Kept pixels (``--keep-pixels``): the source's own pixels where the keep weight is 1, the decode where it is 0, a
smooth mix through the band; properties through the CLI on the tiny preset (whose decoder moves every pixel)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from editinfinity.cli import main
from editinfinity.edit.case import CaseSpec
from editinfinity.edit.generate import generate_edit
from editinfinity.edit.masking import used_weights_dir
from editinfinity.edit.pixels import keep_source_pixels, pixel_keep_weights
from editinfinity.edit.prepare import prepare_case
from editinfinity.edit.settings import EditSettings
from editinfinity.models.bundle import load_models

FAST = ["--prompt-iters", "1", "--lora-iters", "1", "--preset", "tiny", "-q"]


def _pictures(h: int = 64, w: int = 80, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a), Image.fromarray(b)


def _far_from_band(weights: torch.Tensor, size: tuple[int, int], value: float) -> np.ndarray:
    """Pixels whose cell's whole 3x3 neighbourhood has keep weight ``value`` (computed independently of the module:
    unfold the padded grid and test every neighbour)."""
    g = F.pad(weights[None, None].float(), (1, 1, 1, 1), mode="replicate")
    neigh = F.unfold(g, 3)[0].T.reshape(*weights.shape, 9)
    cells = (neigh == value).all(dim=-1).float()
    return F.interpolate(cells[None, None], size=size, mode="nearest")[0, 0].bool().numpy()


def test_pixel_weights_exact_far_from_the_band_and_smooth_across_it():
    w = torch.ones(5, 6)
    w[1:3, 2:4] = 0.0
    w[3, 2:4] = 0.5
    size = (80, 96)  # 16 px per cell
    wp = pixel_keep_weights(w, size)
    assert wp.shape == size and wp.dtype == torch.float32
    assert float(wp.min()) >= 0.0 and float(wp.max()) <= 1.0
    assert (wp.numpy()[_far_from_band(w, size, 1.0)] == 1.0).all()
    assert (wp.numpy()[_far_from_band(w, size, 0.0)] == 0.0).all()
    # Smooth: no jump between neighbouring pixels larger than one cell's bilinear step (1 / 16 px) anywhere.
    assert float((wp[:, 1:] - wp[:, :-1]).abs().max()) <= 1 / 16 + 1e-6
    assert float((wp[1:] - wp[:-1]).abs().max()) <= 1 / 16 + 1e-6
    assert torch.equal(pixel_keep_weights(torch.ones(4, 4), (64, 64)), torch.ones(64, 64))
    with pytest.raises(ValueError, match="grid"):
        pixel_keep_weights(torch.ones(2, 2, 2), (8, 8))


def test_keep_source_pixels_takes_each_image_where_its_weight_is_exact():
    source, decoded = _pictures()
    grid = (4, 5)
    assert np.array_equal(np.asarray(keep_source_pixels(source, decoded, torch.ones(grid))), np.asarray(source))
    assert np.array_equal(np.asarray(keep_source_pixels(source, decoded, torch.zeros(grid))), np.asarray(decoded))
    w = torch.ones(grid)
    w[2, 2] = 0.0
    out = np.asarray(keep_source_pixels(source, decoded, w))
    far = _far_from_band(w, (64, 80), 1.0)
    assert np.array_equal(out[far], np.asarray(source)[far])
    wp = pixel_keep_weights(w, (64, 80)).numpy()[..., None]
    mixed = np.rint(wp * np.asarray(source, np.float32) + (1 - wp) * np.asarray(decoded, np.float32))
    assert np.abs(out.astype(np.float32) - mixed).max() <= 0.0  # the documented mix, rounded to the nearest byte
    with pytest.raises(ValueError, match="differ in size"):
        keep_source_pixels(source, decoded.resize((40, 32)), w)


@pytest.fixture(scope="module")
def edits(tmp_path_factory, example) -> dict:
    """One user-mask edit with kept pixels and one without (the published output), same seed."""
    root = tmp_path_factory.mktemp("kept")
    out = {}
    for name, flag in (("kept", "--keep-pixels"), ("published", "--no-keep-pixels")):
        assert main(["edit", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt",
                     example["edit_prompt"], "--mask", example["mask"], "--out", str(root / name), flag, *FAST]) == 0
        out[name] = root / name
    return out


def test_far_from_the_mask_the_edit_is_the_source_bit_for_bit(edits):
    out = edits["kept"]
    edited, source = np.asarray(Image.open(out / "edited.png")), np.asarray(Image.open(out / "source.png"))
    assert source.shape == edited.shape
    prepared = np.asarray(Image.open(out / "stages" / "case" / "image.png"))
    assert np.array_equal(source, prepared)  # the source exactly as the model saw it
    record = json.loads((out / "stages" / "generate" / "stage.json").read_text())
    used = used_weights_dir(out / "stages" / "mask", out / "stages" / "generate", record)  # band "auto" kept one
    weights = load_file(str(used / "weights.safetensors"))["weights"]
    far = _far_from_band(weights, source.shape[:2], 1.0)
    assert far.sum() > 0.3 * far.size
    assert np.array_equal(edited[far], source[far])
    decoded = np.asarray(Image.open(out / "stages" / "generate" / "decoded.png"))
    inside = _far_from_band(weights, source.shape[:2], 0.0)
    assert inside.any() and np.array_equal(edited[inside], decoded[inside])
    assert not np.array_equal(decoded[far], source[far])  # the decoder did move them: kept pixels did the work
    summary = json.loads((out / "summary.json").read_text())
    assert summary["keep_pixels"] is True and summary["settings"]["keep_pixels"] is True
    assert summary["metrics"]["source_psnr"] > summary["metrics"]["psnr"]


def test_without_kept_pixels_the_output_is_the_decode(edits):
    out = edits["published"]
    edited = np.asarray(Image.open(out / "edited.png"))
    assert np.array_equal(edited, np.asarray(Image.open(out / "stages" / "generate" / "decoded.png")))
    assert json.loads((out / "summary.json").read_text())["keep_pixels"] is False
    kept = edits["kept"]
    # same codes, same decode: kept pixels only change the output picture
    assert np.array_equal(np.asarray(Image.open(kept / "stages" / "generate" / "decoded.png")), edited)


def test_reference_profile_turns_kept_pixels_off():
    assert EditSettings.from_profile("default").keep_pixels is True
    assert EditSettings.from_profile("reference").keep_pixels is False
    assert EditSettings.from_profile("reference", keep_pixels=True).keep_pixels is True


def test_weights_all_one_give_the_source(example):
    models = load_models("tiny", device="cpu")
    spec = CaseSpec(image=example["image"], prompt=example["prompt"], edit_prompt=example["edit_prompt"],
                    mode="auto", target_word=example["target_word"], resolution="0.06M")
    case = prepare_case(models, spec)
    res = generate_edit(models, case, None, None, torch.ones(case.grid), EditSettings(seed=1))
    assert np.array_equal(np.asarray(res.edited), np.asarray(case.image))
    assert np.array_equal(np.asarray(res.decoded), np.asarray(res.reconstruction))
    assert not np.array_equal(np.asarray(res.decoded), np.asarray(case.image))
