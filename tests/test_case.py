"""Case inputs: image/mask loading, preprocessing, validation and case-file loaders."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from editinfinity.edit.case import CaseSpec
from editinfinity.edit.images import choose_schedule, cover_geometry, load_image, preprocess_image
from editinfinity.edit.mask import cell_fractions_from_pixels
from editinfinity.edit.user_mask import align_mask, load_user_mask, read_mask
from editinfinity.errors import InvalidCaseError
from editinfinity.models import schedules


def _rand_rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _mask_png(tmp_path, arr: np.ndarray, name: str = "mask.png"):
    return _save(Image.fromarray(arr.astype(np.uint8)), tmp_path / name)


# ---------------------------------------------------------------------------------------------------------------
# load_image


def test_missing_image_file(tmp_path):
    with pytest.raises(InvalidCaseError, match=r"image file not found: .*nope\.jpg.*check the path"):
        load_image(tmp_path / "nope.jpg")


def test_directory_instead_of_image(tmp_path):
    with pytest.raises(InvalidCaseError, match="is a directory"):
        load_image(tmp_path)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture")
    with pytest.raises(InvalidCaseError, match=r"notes\.png.*not an image.*PNG or JPEG"):
        load_image(p)


def test_truncated_jpeg_detected(tmp_path, monkeypatch):
    full = _save(_rand_rgb(128, 128), tmp_path / "full.jpg", quality=95)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    # Opening alone succeeds lazily; only a full decode finds the truncation.
    with Image.open(cut) as im:
        assert im.size == (128, 128)
    with pytest.raises(InvalidCaseError, match=r"cut\.jpg.*truncated.*re-export or re-download"):
        load_image(cut)
    # Even if another library switched PIL to tolerate truncated files, we still refuse them.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InvalidCaseError, match="truncated"):
        load_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_corrupt_png_unreadable(tmp_path):
    data = bytearray(_save(_rand_rgb(32, 32), tmp_path / "ok.png").read_bytes())
    data[60:200] = bytes(140)  # wreck the compressed pixel data
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(InvalidCaseError, match=r"bad\.png.*(unreadable|corrupt|truncated)"):
        load_image(bad)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    src = _rand_rgb(20, 30)
    img = src.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(src.convert("L")).astype(np.uint16) * 257)
    ext = "tiff" if mode == "CMYK" else "png"
    out = load_image(_save(img, tmp_path / f"x.{ext}"))
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        np.testing.assert_array_equal(np.asarray(out)[..., 0], np.asarray(src.convert("L")))


def test_exif_orientation_applied(tmp_path):
    img = _rand_rgb(20, 40)  # W 40 x H 20 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    p = _save(img, tmp_path / "rot.jpg", exif=exif)
    assert load_image(p).size == (20, 40)


# ---------------------------------------------------------------------------------------------------------------
# schedule + preprocessing


def test_choose_schedule_square_and_non_square():
    assert choose_schedule(_rand_rgb(300, 300), "0.06M") == schedules.get_schedule(1.0, "0.06M")
    sched = choose_schedule((300, 400), "0.25M")  # (H, W)
    assert schedules.template_of(sched) == schedules.nearest_ratio(0.75)


def test_extreme_aspect_ratio_rejected():
    with pytest.raises(InvalidCaseError, match=r"wide\.png.*ratio 0\.200 .*range 0\.278\.\.3\.60"):
        choose_schedule(Image.new("RGB", (1000, 200)), "0.06M", source="wide.png")
    with pytest.raises(InvalidCaseError, match=r"ratio 4\.000"):
        choose_schedule((800, 200), "0.06M")
    # 20 % beyond the extreme template is still accepted (and cropped).
    assert schedules.template_of(choose_schedule((700, 200), "0.06M")) == 3.0


def test_too_small_image_rejected():
    with pytest.raises(InvalidCaseError, match=r"tiny\.png is 10x10 px.*at least 64x64 px.*smaller `resolution`"):
        choose_schedule(Image.new("RGB", (10, 10)), "1M", source="tiny.png")
    with pytest.raises(InvalidCaseError, match="at least 16x16 px"):
        preprocess_image(Image.new("RGB", (12, 12)), schedules.get_schedule(1.0, "0.06M"))
    # One source pixel per latent cell is enough.
    t, _ = preprocess_image(Image.new("RGB", (16, 16)), schedules.get_schedule(1.0, "0.06M"))
    assert t.shape == (1, 3, 256, 256)


def test_unknown_resolution():
    with pytest.raises(InvalidCaseError, match=r"0\.06M, 0\.25M, 0\.60M, 1M"):
        choose_schedule((256, 256), "2M")


@pytest.mark.parametrize("hw", [(300, 300), (300, 400), (400, 300), (333, 517)])
def test_preprocess_shapes_and_values(hw):
    img = _rand_rgb(*hw)
    sched = choose_schedule(img, "0.06M")
    big_h, big_w = schedules.pixel_size(sched)
    t, pic = preprocess_image(img, sched)
    assert t.shape == (1, 3, big_h, big_w) and t.dtype == torch.float32
    assert pic.size == (big_w, big_h) and pic.mode == "RGB"
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    x = torch.from_numpy(np.asarray(pic).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(t[0], x + x - 1)


def test_preprocess_is_a_centre_crop():
    # 600 wide x 200 high -> 3:1 nearest template 0.333 -> covers then crops equally on both sides.
    arr = np.zeros((200, 660, 3), dtype=np.uint8)
    arr[:, :30] = (255, 0, 0)  # left band
    arr[:, -30:] = (0, 0, 255)  # right band
    img = Image.fromarray(arr)
    sched = schedules.get_schedule(200 / 660, "0.06M")
    (rh, rw), (top, left) = cover_geometry((200, 660), schedules.pixel_size(sched))
    big_h, big_w = schedules.pixel_size(sched)
    assert rh >= big_h and rw >= big_w and top == (rh - big_h) // 2 and left == (rw - big_w) // 2
    _, pic = preprocess_image(img, sched)
    out = np.asarray(pic).astype(int)
    # The bands are cut symmetrically: the same amount of red remains on the left as blue on the right.
    red = (out[..., 0] > 128) & (out[..., 2] < 128)
    blue = (out[..., 2] > 128) & (out[..., 0] < 128)
    assert abs(int(red.sum()) - int(blue.sum())) <= 2 * big_h


@pytest.mark.parity
def test_preprocess_matches_reference_input_tensor(parity_dir, manifest):
    entry = next(f for f in manifest["files"] if f["file"] == "vae_io_256.safetensors")
    img = load_image(parity_dir / "images" / "source_256.png")
    t, pic = preprocess_image(img, choose_schedule(img, "0.06M"))
    assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == entry["input_image_float32_sha256"]
    # A picture already at the template size passes through unchanged (the 0.75 fixture).
    img = load_image(parity_dir / "images" / "source_240x320.png")
    _, pic = preprocess_image(img, choose_schedule(img, "0.06M"))
    np.testing.assert_array_equal(np.asarray(pic), np.asarray(img))


# ---------------------------------------------------------------------------------------------------------------
# user masks


def test_mask_alignment_follows_image_preprocessing(tmp_path):
    h, w = 300, 500  # not a template ratio: the cover-resize crops the sides
    img = np.full((h, w, 3), 128, dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    for y0, y1, x0, x1 in [(40, 120, 20, 100), (150, 280, 300, 480), (0, 60, 400, 500)]:
        img[y0:y1, x0:x1] = (255, 0, 0)
        mask[y0:y1, x0:x1] = 255
    image = Image.fromarray(img)
    sched = choose_schedule(image, "0.25M")
    size, grid = schedules.pixel_size(sched), schedules.last_grid(sched)
    _, pic = preprocess_image(image, sched)
    red = np.asarray(pic)[..., 0].astype(int) - np.asarray(pic)[..., 1].astype(int) > 64
    red_cells = cell_fractions_from_pixels(red, grid) >= 0.5
    for name, m in [("full.png", mask), ("half.png", mask[::2, ::2])]:  # drawn at full and half resolution
        pixels, fine = load_user_mask(_mask_png(tmp_path, m, name), size, grid, original_size=image.size)
        assert pixels.shape == size
        assert torch.equal(fine >= 0.5, red_cells), name
        assert (pixels.numpy() != red).mean() < 0.01, name


def test_mask_modes_polarity_and_grey_threshold(tmp_path):
    arr = np.full((64, 64), 255, dtype=np.uint8)
    arr[:32, :32] = 0  # black square (top-left)
    arr[40:, 40:] = 128  # 128 counts as dark (reference: light iff > 128)
    arr[40:, :8] = 129  # 129 counts as light
    grid = (4, 4)
    _, white = load_user_mask(_mask_png(tmp_path, arr, "g.png"), (64, 64), grid, "white-edit")
    pix_black, black = load_user_mask(tmp_path / "g.png", (64, 64), grid, "black-edit")
    expected_dark = arr <= 128
    np.testing.assert_array_equal(pix_black.numpy(), expected_dark)
    assert torch.allclose(white + black, torch.ones(4, 4, dtype=torch.float64))
    # RGB and RGBA (fully opaque) files give the same mask as grayscale.
    rgb = _save(Image.fromarray(arr).convert("RGB"), tmp_path / "rgb.png")
    rgba = _save(Image.fromarray(arr).convert("RGBA"), tmp_path / "rgba.png")
    for p in (rgb, rgba):
        np.testing.assert_array_equal(load_user_mask(p, (64, 64), grid, "black-edit")[0].numpy(), expected_dark)


def test_transparent_pixels_are_background(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)  # transparent black background
    rgba[10:30, 10:30] = (255, 255, 255, 255)  # opaque white square
    p = _save(Image.fromarray(rgba), tmp_path / "cut.png")
    for pol in ("white-edit", "black-edit"):
        if pol == "white-edit":
            pix, _ = load_user_mask(p, (64, 64), (4, 4), pol)
            assert int(pix.sum()) == 400 and bool(pix[10:30, 10:30].all())
        else:
            # Black-edit finds no opaque dark pixel; white-edit would work, and the message says so.
            with pytest.raises(InvalidCaseError, match=r"cut\.png.*no pixel.*--mask-polarity white-edit"):
                load_user_mask(p, (64, 64), (4, 4), pol)


def test_mask_covering_everything_or_nothing(tmp_path):
    white = _mask_png(tmp_path, np.full((64, 64), 255), "white.png")
    with pytest.raises(InvalidCaseError, match=r"white\.png.*every pixel.*--whole-image"):
        load_user_mask(white, (64, 64), (4, 4), "white-edit")
    with pytest.raises(InvalidCaseError, match=r"white\.png.*no pixel.*Draw the region to edit in black"):
        load_user_mask(white, (64, 64), (4, 4), "black-edit")
    # A tiny region: no cell reaches 20 %.
    arr = np.zeros((64, 64))
    arr[5, 5] = 255
    with pytest.raises(InvalidCaseError, match=r"dot\.png.*no latent cell.*larger"):
        load_user_mask(_mask_png(tmp_path, arr, "dot.png"), (64, 64), (4, 4), "white-edit")
    # A black object on white read as white-edit: every cell is >= 20 % white, the inverse would be usable.
    arr = np.full((64, 64), 255)
    arr[22:42, 22:42] = 0
    with pytest.raises(InvalidCaseError, match=r"every latent cell.*--mask-polarity black-edit.*--whole-image"):
        load_user_mask(_mask_png(tmp_path, arr, "obj.png"), (64, 64), (4, 4), "white-edit")
    assert load_user_mask(tmp_path / "obj.png", (64, 64), (4, 4), "black-edit")[0].sum() == 400
    # A grid of lines touches every cell, and so does its inverse: no polarity hint.
    arr = np.zeros((64, 64))
    arr[::4, :] = 255
    arr[:, ::4] = 255
    with pytest.raises(InvalidCaseError, match=r"every latent cell") as err:
        load_user_mask(_mask_png(tmp_path, arr, "lines.png"), (64, 64), (16, 16), "white-edit")
    assert "--mask-polarity black-edit" not in str(err.value)


def test_mostly_edit_mask_warns_about_polarity(tmp_path, caplog):
    arr = np.full((64, 64), 255)
    arr[20:40, 20:40] = 0  # black object on white: with white-edit the background is edited
    with caplog.at_level(logging.WARNING, logger="editinfinity.edit.user_mask"):
        load_user_mask(_mask_png(tmp_path, arr, "inv.png"), (64, 64), (8, 8), "white-edit")
    assert "--mask-polarity black-edit" in caplog.text


def test_unreadable_and_missing_mask(tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(InvalidCaseError, match=r"mask file .*garbage\.png \(field `mask`\).*not an image"):
        load_user_mask(bad, (64, 64), (4, 4))
    with pytest.raises(InvalidCaseError, match=r"mask file not found: .*absent\.png"):
        read_mask(tmp_path / "absent.png")
    with pytest.raises(InvalidCaseError, match="mask_polarity"):
        load_user_mask(bad, (64, 64), (4, 4), polarity="white")


def test_align_mask_same_size_is_identity():
    m = np.random.default_rng(0).random((48, 64)) < 0.5
    np.testing.assert_array_equal(align_mask(m, (48, 64)), m)


# ---------------------------------------------------------------------------------------------------------------
# CaseSpec


@pytest.fixture()
def image_file(tmp_path):
    return _save(_rand_rgb(64, 64), tmp_path / "img.png")


def _spec(image_file, **kw) -> CaseSpec:
    base = dict(image=str(image_file), prompt="a glass of red drink on the beach",
                edit_prompt="a glass of red wine on the beach", mode="auto", target_word="drink")
    base.update(kw)
    return CaseSpec(**base)


def test_valid_spec(image_file):
    spec = _spec(image_file).validate()
    assert CaseSpec.field_names() == list(spec.to_dict())
    assert "seed" not in spec.to_dict() and "preset" not in spec.to_dict()  # settings are not case fields


@pytest.mark.parametrize("field_name", ["prompt", "edit_prompt"])
@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty_prompt(image_file, field_name, value):
    with pytest.raises(InvalidCaseError, match=rf"`{field_name}` is empty"):
        _spec(image_file, **{field_name: value}).validate()


def test_equal_prompts_warn_not_fail(image_file, caplog):
    with caplog.at_level(logging.WARNING, logger="editinfinity.edit.case"):
        spec = _spec(image_file, edit_prompt="a glass of red drink on the  beach").validate()
        assert "equals `prompt`" not in caplog.text  # checking a spec is silent: a run checks it many times
        spec.warn_if_reconstruction()
    assert caplog.text.count("equals `prompt`") == 1


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(mode="auto", target_word=None), r"mode 'auto' needs `target_word`"),
        (dict(mode="auto", mask="m.png"), r"remove `mask`"),
        (dict(mode="mask", target_word=None), r"mode 'mask' needs a `mask` file"),
        (dict(mode="mask", mask="m.png"), r"remove `target_word`"),
        (dict(mode="whole"), r"mode 'whole' .* remove `target_word`"),
        (dict(mode="whole", target_word=None, mask="m.png"), r"remove `mask`"),
        (dict(mode="inpaint"), r"`mode` must be one of auto, mask, whole"),
        (dict(target_word="cat"), r"`target_word` 'cat' does not occur in `prompt`.*glass, of, red, drink"),
        (dict(mask_polarity="white"), r"`mask_polarity` must be one of white-edit, black-edit"),
        (dict(resolution="4K"), r"`resolution` must be one of"),
        (dict(image="missing.png"), r"`image` file not found: missing\.png"),
    ],
)
def test_spec_errors(image_file, kw, pattern):
    with pytest.raises(InvalidCaseError, match=pattern):
        _spec(image_file, **kw).validate()


def test_spec_with_loaded_picture_and_from_dict_without_files(image_file):
    spec = _spec(image_file, image=Image.open(image_file).convert("RGB")).validate()
    assert isinstance(spec.image, Image.Image)
    # A spec read back from a case artifact may name a file of another machine: from_dict does not check files.
    data = _spec(image_file, image="/elsewhere/img.png").to_dict()
    assert CaseSpec.from_dict(data).image == "/elsewhere/img.png"
    with pytest.raises(InvalidCaseError, match="file not found"):
        CaseSpec.from_dict(data, check_files=True)


def test_target_word_matching_is_case_and_punctuation_insensitive(image_file):
    _spec(image_file, prompt="A glass of red Drink, on the beach.", target_word="drink").validate()
    _spec(image_file, target_word="red drink").validate()
    with pytest.raises(InvalidCaseError, match="does not occur"):
        _spec(image_file, target_word="drink red").validate()


def test_from_yaml_and_json(tmp_path, image_file):
    mask = _mask_png(tmp_path, np.pad(np.full((20, 20), 255), 22), "m.png")
    yaml_path = tmp_path / "case.yaml"
    yaml_path.write_text(
        "image: img.png\nprompt: a cup on a table\nedit_prompt: a candle on a table\nmask: m.png\n"
    )
    spec = CaseSpec.from_file(yaml_path)
    assert spec.mode == "mask" and spec.mask == str(mask) and spec.image == str(image_file)
    assert spec.run_settings == {}
    # The run settings a case file may give are kept and used (as the CLI's --case uses them), never dropped.
    yaml_path.write_text(yaml_path.read_text() + "seed: 3\nprompt_iters: 0\nlora_iters: 7\nthreshold: 0.25\n"
                         "preset: tiny\n")
    spec = CaseSpec.from_file(yaml_path)
    assert spec.run_settings == {"seed": 3, "prompt_iters": 0, "lora_iters": 7, "threshold": 0.25, "preset": "tiny"}
    assert "seed" not in spec.to_dict() and "run_settings" not in spec.to_dict()
    settings = spec.edit_settings()
    assert (settings.seed, settings.prompt_iters, settings.lora_iters, settings.threshold) == (3, 0, 7, 0.25)
    reference = spec.edit_settings("reference", seed=5, lora_iters=None)  # an override replaces the file's value
    assert (reference.seed, reference.lora_iters, reference.lora_batch) == (5, 7, 2)
    for bad, flag in (("seed: -1", "--seed"), ("lora_iters: 2.5", "--lora-iters"), ("threshold: 1.5", "--threshold"),
                      ("prompt_iters: true", "--prompt-iters"), ("preset: ''", "--preset")):
        yaml_path.write_text("image: img.png\nprompt: a cup\nedit_prompt: a mug\nmode: whole\n" + bad + "\n")
        with pytest.raises(InvalidCaseError, match=rf"`{bad.split(':')[0]}` .* is not valid; see {flag}"):
            CaseSpec.from_file(yaml_path)
    json_path = tmp_path / "case.json"
    json_path.write_text(json.dumps({"image": str(image_file), "prompt": "a cup", "edit_prompt": "a mug",
                                     "mode": "whole", "resolution": "0.25M"}))
    spec = CaseSpec.from_file(json_path)
    assert spec.mode == "whole" and spec.resolution == "0.25M"
    assert CaseSpec.from_dict(spec.to_dict()) == spec


def test_case_file_errors(tmp_path, image_file):
    p = tmp_path / "bad.yaml"
    p.write_text("image: img.png\nprompt: [unclosed\n")
    with pytest.raises(InvalidCaseError, match=r"bad\.yaml is not valid YAML"):
        CaseSpec.from_file(p)
    p.write_text("image: img.png\nprompt: a\nedit_prompt: b\nmode: whole\ncolour: red\n")
    with pytest.raises(InvalidCaseError, match=r"unknown field\(s\) colour; allowed: image, prompt.*, seed"):
        CaseSpec.from_file(p)
    p.write_text("image: img.png\nedit_prompt: b\n")
    with pytest.raises(InvalidCaseError, match=r"missing required field `prompt`"):
        CaseSpec.from_file(p)
    p.write_text("- image: img.png\n")
    with pytest.raises(InvalidCaseError, match="must be a mapping"):
        CaseSpec.from_file(p)
    with pytest.raises(InvalidCaseError, match=r"case file not found: .*none\.yaml"):
        CaseSpec.from_file(tmp_path / "none.yaml")


def _reference_case(root, *, word: str | None = "drink, glass", mask: bool = False):
    (root / "image").mkdir(parents=True)
    (root / "prompt").mkdir()
    _save(_rand_rgb(64, 64), root / "image" / "original_image.jpg")
    (root / "prompt" / "original_image_prompt.txt").write_text("a glass of red drink on the beach\n")
    (root / "prompt" / "edit_image_prompt.txt").write_text("a glass of red wine on the beach")
    if word is not None:
        (root / "prompt" / "target_word.txt").write_text(word)
    if mask:
        arr = np.full((64, 64), 255, dtype=np.uint8)
        arr[10:40, 10:40] = 0
        _save(Image.fromarray(arr), root / "image" / "mask.png")
    return root


def test_reference_dir_modes(tmp_path):
    spec = CaseSpec.from_reference_dir(_reference_case(tmp_path / "ex3"))
    assert (spec.mode, spec.target_word, spec.mask) == ("auto", "drink", None)
    assert spec.prompt == "a glass of red drink on the beach"
    spec = CaseSpec.from_reference_dir(_reference_case(tmp_path / "ex2", word=None, mask=True), resolution="0.25M")
    assert spec.mode == "mask" and spec.mask_polarity == "black-edit" and spec.resolution == "0.25M"
    assert spec.mask.endswith("mask.png")
    # The reference's mask.png is black = edit: the black square is what we edit.
    pix, _ = load_user_mask(spec.mask, (64, 64), (4, 4), spec.mask_polarity)
    assert bool(pix[10:40, 10:40].all()) and int(pix.sum()) == 900
    spec = CaseSpec.from_reference_dir(_reference_case(tmp_path / "ex1", word=None))
    assert spec.mode == "whole" and spec.target_word is None and spec.mask is None


def test_reference_dir_missing_files(tmp_path):
    root = _reference_case(tmp_path / "c", word=None)
    (root / "prompt" / "edit_image_prompt.txt").unlink()
    with pytest.raises(InvalidCaseError, match=r"missing file .*prompt/edit_image_prompt\.txt"):
        CaseSpec.from_reference_dir(root)
    root = _reference_case(tmp_path / "d", word=None)
    (root / "image" / "original_image.jpg").unlink()
    with pytest.raises(InvalidCaseError, match=r"missing image file .*image/original_image\.jpg"):
        CaseSpec.from_reference_dir(root)
    root = _reference_case(tmp_path / "e", word=None)
    with pytest.raises(InvalidCaseError, match=r"missing mask file .*image/mask\.png"):
        CaseSpec.from_reference_dir(root, mode="mask")
    with pytest.raises(InvalidCaseError, match=r"missing file .*prompt/target_word\.txt"):
        CaseSpec.from_reference_dir(root, mode="auto")
    with pytest.raises(InvalidCaseError, match="directory not found"):
        CaseSpec.from_reference_dir(tmp_path / "nowhere")
