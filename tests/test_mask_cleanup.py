"""Automatic-mask cleanup (edit.mask): connected regions, hole filling, removal of small regions, and the settings."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from editinfinity.edit.mask import (
    clean_mask,
    connected_components,
    fill_holes,
    min_region_cells,
    remove_small_regions,
)
from editinfinity.edit.settings import EditSettings
from editinfinity.errors import InvalidCaseError

EIGHT = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
FOUR = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def _bfs_regions(mask: np.ndarray, steps) -> list[set[tuple[int, int]]]:
    """Connected regions by breadth-first search, cell by cell (slow and plain: the test's own judge)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for r in range(h):
        for c in range(w):
            if not mask[r, c] or seen[r, c]:
                continue
            region, todo = set(), deque([(r, c)])
            seen[r, c] = True
            while todo:
                cell = todo.popleft()
                region.add(cell)
                for dr, dc in steps:
                    y, x = cell[0] + dr, cell[1] + dc
                    if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                        seen[y, x] = True
                        todo.append((y, x))
            regions.append(region)
    return regions


def _random_masks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(3, 20, size=2)
        yield rng.random((h, w)) < rng.uniform(0.2, 0.7)


def test_connected_components_match_a_breadth_first_search():
    for m in _random_masks(40):
        labels, sizes = connected_components(m)
        regions = _bfs_regions(m, EIGHT)
        assert len(sizes) == len(regions) and int(labels.max()) == len(regions)
        # numbered by first cell in reading order, as the search finds them
        for i, region in enumerate(regions, start=1):
            cells = {tuple(map(int, rc)) for rc in torch.nonzero(labels == i)}
            assert cells == region
            assert sizes[i - 1] == len(region)
        assert torch.equal(labels > 0, torch.from_numpy(m))
    # 4-connectivity splits a diagonal pair, 8-connectivity joins it
    diag = np.eye(3, dtype=bool)
    assert len(connected_components(diag)[1]) == 1
    assert len(connected_components(diag, connectivity=4)[1]) == 3
    labels, sizes = connected_components(np.zeros((4, 5), dtype=bool))
    assert not labels.any() and sizes.numel() == 0


def test_a_hole_inside_a_selected_region_is_filled():
    m = np.zeros((9, 9), dtype=bool)
    m[2:7, 2:7] = True
    m[4, 4] = False  # one-cell hole
    m[3, 5] = False  # another, touching the first only diagonally (4-connected background: still enclosed)
    got = fill_holes(m)
    assert got[4, 4] and got[3, 5]
    assert torch.equal(got, torch.from_numpy(np.pad(np.ones((5, 5), bool), 2)))
    # a gap that reaches the border is no hole
    notch = m.copy()
    notch[4, 2:5] = False
    assert not fill_holes(notch)[4, 2]


def test_hole_filling_adds_exactly_the_enclosed_background():
    for m in _random_masks(40, seed=1):
        got = fill_holes(m).numpy()
        assert not (m & ~got).any()  # never removes a cell
        h, w = m.shape
        outside = set()
        for region in _bfs_regions(~m, FOUR):
            if any(r in (0, h - 1) or c in (0, w - 1) for r, c in region):
                outside |= region
        want = np.ones_like(m)
        for r, c in outside:
            want[r, c] = False
        assert np.array_equal(got, want)
        assert np.array_equal(fill_holes(got).numpy(), got)  # idempotent


def test_an_isolated_cell_below_the_size_is_removed():
    m = np.zeros((16, 16), dtype=bool)
    m[4:9, 4:9] = True  # the object, 25 cells
    m[0, 15] = True  # a stray cell at the border
    m[10, 10] = True  # one diagonal to nothing: isolated
    m[12:14, 1] = True  # a 2-cell stray
    got = remove_small_regions(m, 3)
    assert not got[0, 15] and not got[10, 10] and not got[12:14, 1].any()
    want = np.zeros_like(m)
    want[4:9, 4:9] = True
    assert torch.equal(got, torch.from_numpy(want))
    assert torch.equal(remove_small_regions(m, 2)[12:14, 1], torch.ones(2, dtype=torch.bool))  # 2 cells >= 2


def test_removal_keeps_regions_at_or_above_the_size_and_never_empties_the_mask():
    for m in _random_masks(40, seed=2):
        for k in (2, 3, 5, 50):
            got = remove_small_regions(m, k).numpy()
            regions = _bfs_regions(m, EIGHT)
            if not regions:
                assert not got.any()
                continue
            largest = max(len(r) for r in regions)
            for region in regions:
                kept = {got[rc] for rc in region}
                assert len(kept) == 1  # a region is kept or dropped whole
                assert kept == {len(region) >= k or len(region) == largest} or len(region) == largest
            assert got.any()
            assert not (got & ~m).any()


def test_a_mask_without_holes_or_small_parts_is_unchanged():
    m = np.zeros((16, 16), dtype=bool)
    m[2:6, 2:7] = True
    m[9:14, 8:12] = True
    for kw in ({}, {"holes": True}, {"min_region": 0.05}, {"holes": True, "min_region": 0.05}):
        assert torch.equal(clean_mask(m, **kw), torch.from_numpy(m)), kw
    for m in _random_masks(20, seed=3):  # both off: the reference's mask as it is
        assert torch.equal(clean_mask(m), torch.from_numpy(m))


def test_the_size_is_a_fraction_of_the_grid():
    assert min_region_cells((16, 16), 0.0) == 0
    assert min_region_cells((16, 16), 2 / 256) == 2
    assert min_region_cells((64, 64), 2 / 256) == 32  # the same share of the picture at 1M
    with pytest.raises(ValueError, match="min_region"):
        min_region_cells((16, 16), 1.0)
    # a 2-cell region on a 16x16 grid is below 3/256, a 5-cell one is not
    m = np.zeros((16, 16), dtype=bool)
    m[0, 0:2] = True
    m[8, 3:8] = True
    got = clean_mask(m, min_region=3 / 256)
    assert not got[0].any() and got[8].sum() == 5


def test_cleanup_settings_are_validated_and_edit_only():
    from editinfinity.edit.learned import EDIT_ONLY_SETTINGS

    assert {"fill_holes", "min_region"} <= EDIT_ONLY_SETTINGS
    with pytest.raises(InvalidCaseError, match="min-region"):
        EditSettings.from_profile("default", min_region=1.5)
    s = EditSettings.from_profile("reference")
    assert not s.fill_holes and s.min_region == 0.0  # the reference thresholds only
