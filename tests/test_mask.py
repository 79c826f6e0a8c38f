"""Edit masks and smoothing weights: parity with the reference fixtures, and properties of the kernel."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from editinfinity.edit.mask import (
    attention_threshold_value,
    cell_fractions_from_pixels,
    city_block_distance,
    coarse_fractions,
    grow_within,
    selected_cells,
    smoothing_weights,
    threshold_attention,
    weights_from_edit_mask,
    weights_from_pixel_mask,
)
from editinfinity.edit.user_mask import load_user_mask, read_mask
from editinfinity.errors import InvalidCaseError

# The reference's mask files mark the edit region in black (README "Other files": masks/*.png, black = edit).
REFERENCE_POLARITY = "black-edit"


def _file_entry(manifest: dict, name: str) -> dict:
    return next(f for f in manifest["files"] if f["file"] == name)


def _coord(fractions: torch.Tensor, threshold: float) -> torch.Tensor:
    """The library's cell selection as the fixture's uint8 coord grid."""
    return selected_cells(fractions, threshold).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# parity: mask_weights.safetensors


@pytest.mark.parity
def test_user_masks_match_reference_weights(parity_dir, manifest):
    entry = _file_entry(manifest, "mask_weights.safetensors")
    fx = load_file(parity_dir / "mask_weights.safetensors")
    ratio = manifest["settings"]["edit"]["black_ratio_threshold"]
    checked = 0
    for name, case in entry["mask_cases"].items():
        shape_hw = tuple(case["shape_hw"])
        grid = tuple(fx[f"{name}/weights"].shape)
        png = parity_dir / case["png"]
        with Image.open(png) as im:
            assert im.size[::-1] == shape_hw, name
        # Where the grid divides the mask our exact partition is the reference's; elsewhere the reference's
        # clipped blocks are reproduced on request (see test_exact_partition_on_non_multiple_size_...).
        partition = "exact" if shape_hw[0] % grid[0] == 0 and shape_hw[1] % grid[1] == 0 else "reference"
        if case["n_coord64"] == 0:
            # Our user-level loader refuses a mask that edits nothing; the weight path itself gives all ones.
            with pytest.raises(InvalidCaseError, match="no pixel"):
                load_user_mask(png, shape_hw, grid, REFERENCE_POLARITY)
            pixels = torch.from_numpy(read_mask(png, REFERENCE_POLARITY))
            fine = cell_fractions_from_pixels(pixels, grid, partition=partition)
        else:
            pixels, fine = load_user_mask(png, shape_hw, grid, REFERENCE_POLARITY, partition=partition)
        assert pixels.shape == shape_hw and pixels.dtype == torch.bool
        coarse = coarse_fractions(pixels, partition=partition)
        assert torch.equal(_coord(fine, ratio), fx[f"{name}/coord64"]), name
        assert torch.equal(_coord(coarse, ratio), fx[f"{name}/coord4"]), name
        assert int(_coord(fine, ratio).sum()) == case["n_coord64"], name
        assert int(_coord(coarse, ratio).sum()) == case["n_coord4"], name
        w = smoothing_weights(fine, coarse, cell_threshold=ratio, coarse_threshold=ratio)
        assert w.dtype == torch.float32
        assert torch.equal(w, fx[f"{name}/weights"]), name
        checked += 1
    assert checked == len(entry["mask_cases"]) >= 5


@pytest.mark.parity
def test_exact_partition_on_non_multiple_size_follows_geometry(parity_dir, manifest):
    """Where the reference's blocks do not tile the mask, our exact partition keeps the true geometry."""
    entry = _file_entry(manifest, "mask_weights.safetensors")
    fx = load_file(parity_dir / "mask_weights.safetensors")
    ratio = manifest["settings"]["edit"]["black_ratio_threshold"]
    odd = {n: c for n, c in entry["mask_cases"].items()
           if c["shape_hw"][0] % 64 or c["shape_hw"][1] % 64}
    assert odd, "the fixtures should hold a mask whose size is not a multiple of the grid"
    for name, case in odd.items():
        geo = entry["mask_geometry"][name]
        h, w = case["shape_hw"]
        grid = tuple(fx[f"{name}/weights"].shape)
        pixels, fine = load_user_mask(parity_dir / case["png"], (h, w), grid, REFERENCE_POLARITY)
        # Independent expectation: overlap of the rectangle [y0, y1) x [x0, x1) with each real-valued cell.
        ys = np.arange(grid[0] + 1) * h / grid[0]
        xs = np.arange(grid[1] + 1) * w / grid[1]
        oy = np.clip(np.minimum(ys[1:], geo["y1"]) - np.maximum(ys[:-1], geo["y0"]), 0, None) / (h / grid[0])
        ox = np.clip(np.minimum(xs[1:], geo["x1"]) - np.maximum(xs[:-1], geo["x0"]), 0, None) / (w / grid[1])
        np.testing.assert_allclose(fine.numpy(), np.outer(oy, ox), atol=1e-12)
        # ... which is not what the reference's clipped round(H/N) blocks give (docs/method.md, section 5).
        assert not torch.equal(_coord(fine, ratio), fx[f"{name}/coord64"])


@pytest.mark.parity
def test_attention_thresholds_match_reference(parity_dir, manifest):
    entry = _file_entry(manifest, "mask_weights.safetensors")
    fx = load_file(parity_dir / "mask_weights.safetensors")
    cases = entry["attention_threshold_cases"]
    assert sorted(c["threshold"] for c in cases.values()) == sorted(manifest["settings"]["edit"]["mask_weights_thresholds"])
    for key, case in cases.items():
        t = case["threshold"]
        mask = threshold_attention(fx["attn/map"], t)
        assert torch.equal(mask, fx[f"attn/{key}/mask"] == 0), key  # reference: 0 = edit
        cut = attention_threshold_value(fx["attn/map"], t)
        assert cut.dtype == torch.float32 and cut.item() == fx[f"attn/{key}/white_value"].item(), key
        assert torch.equal(weights_from_edit_mask(mask), fx[f"attn/{key}/weights_direct"]), key


@pytest.mark.parity
def test_rendered_attention_png_reproduces_reference_via_reference_partition(parity_dir, manifest):
    """The reference's PNG round trip (616 px render, 10 px blocks) is reproducible, and differs from direct."""
    entry = _file_entry(manifest, "mask_weights.safetensors")
    fx = load_file(parity_dir / "mask_weights.safetensors")
    for key, case in entry["attention_threshold_cases"].items():
        w_px, h_px = case["rendered_size_wh"]
        grid = tuple(fx[f"attn/{key}/weights_via_png"].shape)
        pixels, fine = load_user_mask(parity_dir / case["rendered_png"], (h_px, w_px), grid, REFERENCE_POLARITY,
                                      partition="reference")
        assert int(pixels.sum()) > 0
        w = smoothing_weights(fine, coarse_fractions(pixels, partition="reference"))
        assert torch.equal(w, fx[f"attn/{key}/weights_via_png"]), key
        diff = (w - fx[f"attn/{key}/weights_direct"]).abs().max().item()
        assert (diff == 0) == case["weights_via_png_equal_direct"]
        assert diff == pytest.approx(case["max_abs_diff_png_vs_direct"])


@pytest.mark.parity
def test_edit_io_attention_map_to_mask_and_weights(parity_dir, manifest):
    entry = _file_entry(manifest, "edit_io_1M.safetensors")
    fx = load_file(parity_dir / "edit_io_1M.safetensors")
    t = entry["attention"]["mask_threshold"]
    assert t == manifest["settings"]["edit"]["mask_threshold"]
    attn = fx["attention/final_attention_map"]
    mask = threshold_attention(attn, t)
    assert torch.equal(mask, fx["attention/mask"] == 0)
    assert int(mask.sum()) == entry["attention"]["n_edit_cells"]
    assert attention_threshold_value(attn, t).item() == fx["attention/white_value"].item()
    assert torch.equal(weights_from_edit_mask(mask), fx["attention/weights_direct"])


@pytest.mark.parity
def test_user_mask_scaled_to_pipeline_image_size_gives_same_weights(parity_dir, manifest):
    """A 512 px reference mask aligned to a 1024 px image (16 px cells) gives the reference's weights."""
    entry = _file_entry(manifest, "mask_weights.safetensors")
    fx = load_file(parity_dir / "mask_weights.safetensors")
    for name, case in entry["mask_cases"].items():
        h, w = case["shape_hw"]
        grid = tuple(fx[f"{name}/weights"].shape)
        if case["n_coord64"] == 0 or h % grid[0] or w % grid[1]:
            continue
        pixels, fine = load_user_mask(parity_dir / case["png"], (2 * h, 2 * w), grid, REFERENCE_POLARITY)
        assert pixels.shape == (2 * h, 2 * w)
        assert torch.equal(smoothing_weights(fine, coarse_fractions(pixels)), fx[f"{name}/weights"]), name


# ---------------------------------------------------------------------------------------------------------------
# properties


def _brute_distance(sel: np.ndarray) -> np.ndarray:
    pts = np.argwhere(sel)
    rr, cc = np.indices(sel.shape)
    return np.min(np.abs(rr[..., None] - pts[:, 0]) + np.abs(cc[..., None] - pts[:, 1]), axis=-1)


@pytest.mark.parametrize("shape", [(16, 16), (15, 20), (37, 11), (1, 9)])
def test_city_block_distance_matches_brute_force(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    sel = rng.random(shape) < 0.05
    sel[rng.integers(shape[0]), rng.integers(shape[1])] = True
    d = city_block_distance(torch.from_numpy(sel))
    assert d.dtype == torch.int64
    np.testing.assert_array_equal(d.numpy(), _brute_distance(sel))


def test_empty_mask_gives_all_ones():
    w = smoothing_weights(torch.zeros(12, 20, dtype=torch.float64), torch.zeros(4, 4))
    assert w.dtype == torch.float32 and w.shape == (12, 20)
    assert torch.equal(w, torch.ones(12, 20))
    assert torch.equal(weights_from_edit_mask(torch.zeros(8, 8, dtype=torch.bool)), torch.ones(8, 8))


def test_small_edit_ramp_values():
    grid = torch.zeros(32, 32, dtype=torch.bool)
    grid[10, 12] = True
    w = weights_from_edit_mask(grid)
    d = _brute_distance(grid.numpy())
    expected = {0: 0.0, 1: 0.0, 2: 0.25, 3: 0.5, 4: 0.75}
    for dist, val in expected.items():
        assert torch.all(w[torch.from_numpy(d == dist)] == val), dist
    assert torch.all(w[torch.from_numpy(d >= 5)] == 1.0)


def test_large_edit_has_no_ramp():
    grid = torch.zeros(64, 64, dtype=torch.bool)
    grid[8:56, 8:56] = True  # touches all 16 coarse blocks
    w = weights_from_edit_mask(grid)
    assert set(w.unique().tolist()) == {0.0, 1.0}
    d = _brute_distance(grid.numpy())
    np.testing.assert_array_equal(w.numpy() == 0, d <= 1)


def test_large_edit_switch_counts_coarse_blocks():
    # Thin cross: selects cells in exactly 5 coarse blocks (small edit) vs 6 (large edit).
    grid = torch.zeros(64, 64, dtype=torch.bool)
    grid[20:28, 20:28] = True  # block (1, 1)
    small = weights_from_edit_mask(grid)
    assert (small == 0.25).any()
    cf = torch.zeros(4, 4, dtype=torch.float64)
    cf.view(-1)[:5] = 1.0
    assert (smoothing_weights(grid.double(), cf) == 0.25).any()
    cf.view(-1)[:6] = 1.0
    assert not (smoothing_weights(grid.double(), cf) == 0.25).any()


def test_weights_properties_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(16, 16), (15, 20), (54, 72)]:
        for density in (0.001, 0.02, 0.3):
            grid = torch.from_numpy(rng.random(shape) < density)
            w = weights_from_edit_mask(grid)
            assert w.shape == shape and w.dtype == torch.float32
            assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
            if grid.any():
                d = _brute_distance(grid.numpy())
                assert torch.all(w[torch.from_numpy(d <= 1)] == 0)  # the mask dilated by one cell
                assert torch.all(w[torch.from_numpy(d > 1)] > 0)
            assert set(w.unique().tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_custom_radii():
    grid = torch.zeros(20, 20, dtype=torch.bool)
    grid[10, 10] = True
    w = smoothing_weights(grid.double(), coarse_fractions(grid), zero_radius=0, ramp_end=2)
    d = torch.from_numpy(_brute_distance(grid.numpy()))
    assert torch.all(w[d == 0] == 0) and torch.all(w[d >= 3] == 1)
    assert torch.allclose(w[d == 1], torch.tensor(1 / 3)) and torch.allclose(w[d == 2], torch.tensor(2 / 3))
    with pytest.raises(ValueError, match="zero_radius"):
        smoothing_weights(grid.double(), coarse_fractions(grid), zero_radius=3, ramp_end=2)


def test_cell_fractions_exact_partition():
    rng = np.random.default_rng(1)
    m = rng.random((64, 48)) < 0.3
    f = cell_fractions_from_pixels(m, (16, 12))
    np.testing.assert_allclose(f.numpy(), m.reshape(16, 4, 12, 4).mean(axis=(1, 3)), atol=0)
    # Same as the reference's blocks whenever the grid divides the size.
    assert torch.equal(f, cell_fractions_from_pixels(m, (16, 12), partition="reference"))
    # Non-multiple sizes: the area is conserved and every fraction is in [0, 1].
    m2 = rng.random((300, 500)) < 0.3
    f2 = cell_fractions_from_pixels(m2, (64, 64))
    assert float(f2.min()) >= 0 and float(f2.max()) <= 1
    assert float(f2.sum()) * (300 / 64) * (500 / 64) == pytest.approx(m2.sum(), rel=1e-12)
    # Fewer pixels than cells: a pixel spreads over the cells it covers.
    f3 = cell_fractions_from_pixels(np.array([[True, False]]), (2, 4))
    np.testing.assert_array_equal(f3.numpy(), [[1, 1, 0, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="partition"):
        cell_fractions_from_pixels(m, (4, 4), partition="nearest")


def test_coarse_fractions_of_non_multiple_grid():
    grid = torch.zeros(54, 72, dtype=torch.bool)
    grid[:14, :18] = True  # block (0, 0) has 13.5 x 18 cells; its half-row 13 is shared with block (1, 0)
    cf = coarse_fractions(grid)
    assert cf.shape == (4, 4)
    assert cf[0, 0].item() == 1.0
    assert cf[1, 0].item() == pytest.approx(0.5 / 13.5)
    assert cf[0, 1].item() == 0.0


def test_weights_from_pixel_mask_matches_two_step():
    m = np.zeros((256, 256), dtype=bool)
    m[40:90, 100:160] = True
    w = weights_from_pixel_mask(m, (16, 16))
    assert torch.equal(w, smoothing_weights(cell_fractions_from_pixels(m, (16, 16)), coarse_fractions(m)))


def test_threshold_is_strict_and_logs(caplog):
    attn = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    with caplog.at_level(logging.INFO, logger="editinfinity.edit.mask"):
        mask = threshold_attention(attn, 0.5)
    assert mask.tolist() == [[False, False], [True, False]]  # 0.5 == cut is not selected
    assert "25.0%" in caplog.text
    assert threshold_attention(attn, 0.2).tolist() == [[False, True], [True, True]]


def test_threshold_relative_to_range():
    attn = torch.tensor([[10.0, 12.0], [14.0, 11.0]])
    assert threshold_attention(attn, 0.5).tolist() == [[False, False], [True, False]]
    assert attention_threshold_value(attn, 0.25).item() == 11.0


def test_constant_map_gives_empty_mask_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="editinfinity.edit.mask"):
        mask = threshold_attention(torch.full((4, 5), 0.3), 0.5)
    assert mask.dtype == torch.bool and not mask.any()
    assert "constant" in caplog.text


def test_threshold_rejects_nan_and_bad_threshold():
    attn = torch.rand(4, 4)
    attn[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        threshold_attention(attn)
    with pytest.raises(ValueError, match="threshold"):
        threshold_attention(torch.rand(4, 4), 1.5)
    with pytest.raises(ValueError, match="2-D"):
        threshold_attention(torch.rand(4))


def test_smoothing_band_scales_with_the_grid_and_equals_the_reference_at_64_cells():
    from editinfinity.edit.mask import band_for_grid

    assert band_for_grid((64, 64)) == band_for_grid((64, 64), "reference") == {"zero_radius": 1, "ramp_end": 4}
    assert band_for_grid((16, 16)) == {"zero_radius": 1, "ramp_end": 1}
    assert band_for_grid((32, 24)) == {"zero_radius": 1, "ramp_end": 2}
    assert band_for_grid((16, 16), "reference") == {"zero_radius": 1, "ramp_end": 4}
    with pytest.raises(ValueError, match="band"):
        band_for_grid((16, 16), "wide")
    gen = torch.Generator().manual_seed(0)
    for side in (16, 64):
        m = torch.zeros(side, side, dtype=torch.bool)
        r = side // 8
        m[side // 2 - r: side // 2 + r, side // 3 - r: side // 3 + r] = True
        m |= torch.rand(side, side, generator=gen) > 0.995
        scaled = weights_from_edit_mask(m, **band_for_grid((side, side)))
        ref = weights_from_edit_mask(m)
        assert torch.equal(scaled == 0, ref == 0)  # the same dilated edit region
        if side == 64:
            assert torch.equal(scaled, ref)
        else:  # a narrower band: more cells keep the source, none keeps less of it
            assert (scaled >= ref).all() and (scaled == 1).sum() > (ref == 1).sum()


def test_grow_within_follows_8_connectivity_inside_the_allowed_cells():
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    allowed[0, 0] = allowed[1, 1] = allowed[2, 2] = True  # a diagonal chain
    allowed[4:, 4:] = True  # a separate block
    seeds = torch.zeros(6, 6, dtype=torch.bool)
    seeds[0, 0] = True
    got = grow_within(seeds, allowed)
    assert got.sum() == 3 and got[2, 2] and not got[4:, 4:].any()
    assert torch.equal(grow_within(allowed, allowed), allowed)
    assert not grow_within(torch.zeros(6, 6, dtype=torch.bool), allowed).any()


def test_core_threshold_drops_weak_regions_and_keeps_the_peak():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = torch.from_numpy(rng.random((12, 12)))
        plain = threshold_attention(a, 0.5)
        assert torch.equal(threshold_attention(a, 0.5, 0.0), plain)
        assert torch.equal(threshold_attention(a, 0.5, 0.5), plain)  # core <= threshold: every selected cell
        for core in (0.7, 0.9, 1.0):
            got = threshold_attention(a, 0.5, core)
            assert not (got & ~plain).any()  # never adds a cell
            peak = divmod(int(a.argmax()), 12)
            assert got[peak]
            # every kept region reaches the core level, every dropped one does not
            cut = a.min() + core * (a.max() - a.min())
            assert torch.equal(got, grow_within(a >= cut, plain))
    # a strong blob and a weak stray blob: the stray one goes
    a = torch.zeros(8, 8)
    a[1:3, 1:3] = 1.0
    a[6, 6] = 0.6
    assert threshold_attention(a, 0.5).sum() == 5
    kept = threshold_attention(a, 0.5, 0.75)
    assert kept.sum() == 4 and not kept[6, 6]
    with pytest.raises(ValueError, match="core"):
        threshold_attention(a, 0.5, 1.5)


def test_core_threshold_setting_is_validated():
    from editinfinity.edit.settings import EditSettings

    with pytest.raises(InvalidCaseError, match="core-threshold"):
        EditSettings.from_profile("default", core=-0.1)
