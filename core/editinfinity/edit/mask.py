"""Edit masks and the smoothing weight map ``W`` on the final latent grid (docs/method.md, sections 5 and 6).

Conventions (docs/method.md): an *edit mask* is boolean, ``True`` = the region to edit; the *keep weight*
``W`` is float32 in ``[0, 1]``, ``1`` = keep the source code, ``0`` = take the generated code. Everything lives on
the final latent grid ``(h_K, w_K)`` of the case's schedule; no PNG round trip (the published code renders the mask through a plotting figure), no per-cell
Python loops.

Pipeline:

* mode "auto": ``threshold_attention(map)`` -> bool grid -> ``weights_from_edit_mask(grid)``;
* mode "mask": pixel edit mask -> ``cell_fractions_from_pixels`` (fine cells) and ``coarse_fractions`` (4x4
  blocks) -> ``smoothing_weights``.

Partition of a pixel mask into cells
------------------------------------
``partition="exact"`` (default) cuts the ``H x W`` pixel mask into ``N_h x N_w`` boxes with real-valued edges
``[i*H/N_h, (i+1)*H/N_h)``; a pixel straddling an edge counts towards both cells in proportion to its area. When
``N`` divides the size (always the case inside the pipeline: masks are aligned to the preprocessed image, 16 px per
latent cell) these are the integer blocks of ``round(H/N)`` pixels that the reference's ``mask_to_coord`` uses, and the
fractions are bit-identical to the reference's. When ``N`` does not divide the size, the reference's blocks do not
tile the image (``round(300/64) = 5`` px rows cover 320 rows: the last blocks re-read the last pixel line, and the
mask drifts by up to a few cells, docs/method.md section 5); ``partition="exact"`` stays geometrically correct there, and
``partition="reference"`` reproduces the reference's blocks exactly for parity checks.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "attention_threshold_value",
    "threshold_attention",
    "grow_within",
    "connected_components",
    "fill_holes",
    "remove_small_regions",
    "min_region_cells",
    "clean_mask",
    "cell_fractions_from_pixels",
    "coarse_fractions",
    "city_block_distance",
    "selected_cells",
    "smoothing_weights",
    "weights_from_edit_mask",
    "weights_from_pixel_mask",
    "PARTITIONS",
    "BANDS",
    "AUTO_BAND",
    "BAND_CHOICES",
    "band_for_grid",
    "candidate_bands",
]

#: Supported ways to cut a pixel mask into cells (see the module docstring).
PARTITIONS = ("exact", "reference")

#: Number of coarse blocks per side (the reference's 4x4 "large edit" test).
COARSE_BLOCKS = (4, 4)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    if t.dim() != 2:
        raise ValueError(f"`{name}` must be a 2-D (rows, cols) array, got shape {tuple(t.shape)}")
    return t


def _grid(grid, name: str = "grid") -> tuple[int, int]:
    try:
        n_h, n_w = (int(v) for v in grid)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be a pair (rows, cols), got {grid!r}") from e
    if n_h < 1 or n_w < 1:
        raise ValueError(f"`{name}` must have positive sides, got {grid!r}")
    return n_h, n_w


# ---------------------------------------------------------------------------------------------------------------
# attention map -> edit mask (docs/method.md, section 5)


def attention_threshold_value(attn, threshold: float = 0.5) -> torch.Tensor:
    """The cut ``min + threshold * (max - min)`` as a 0-d tensor in the map's float dtype.

    Computed in the map's own precision (float32 for the model's maps), in the same order of operations as the
    reference (``generate_attention_mask``), so ties resolve identically.
    """
    a = _as_tensor(attn, "attn")
    if not a.is_floating_point():
        a = a.to(torch.float32)
    if not torch.isfinite(a).all():
        raise ValueError(
            "`attn` contains NaN or infinite values; the target word's token range is probably empty "
            "(a reversed or missing range averages over no columns)"
        )
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must lie in [0, 1] (a fraction of the map's range), got {threshold!r}")
    lo, hi = a.min(), a.max()
    return lo + float(threshold) * (hi - lo)


def threshold_attention(attn, threshold: float = 0.5, core: float = 0.0) -> torch.Tensor:
    """Edit mask from a cross-attention map: ``attn > min + threshold * (max - min)`` (strict).

    Args:
        attn: ``(h_K, w_K)`` map (tensor or array) of the target word.
        threshold: relative cut in ``[0, 1]`` (0.5 in the reference scripts).
        core: hysteresis level in ``[0, 1]``. A selected region (8-connected cells above ``threshold``) is kept
            only if it holds a cell at or above ``min + core * (max - min)``: weak regions that never reach the
            core level (stray cells at picture borders or at other objects' edges) are dropped. ``core=1`` keeps
            only the region of the map's peak; ``core <= threshold`` keeps every selected cell (the reference).

    Returns:
        ``(h_K, w_K)`` bool tensor, ``True`` = edit. A constant map has no structure to cut: the mask is empty and a
        warning is logged (the edit then reproduces the source).
    """
    a = _as_tensor(attn, "attn")
    if not a.is_floating_point():
        a = a.to(torch.float32)
    cut = attention_threshold_value(a, threshold)
    if bool(a.max() == a.min()):
        logger.warning(
            "attention map is constant (%.6g everywhere): no region stands out, the edit mask is empty and the "
            "result will reproduce the source image", float(a.max())
        )
        return torch.zeros(a.shape, dtype=torch.bool)
    mask = a > cut
    if not 0.0 <= core <= 1.0:
        raise ValueError(f"core threshold must be in [0, 1], got {core}")
    if core > threshold:
        selected = int(mask.sum())
        mask = grow_within(a >= attention_threshold_value(a, core), mask)
        logger.info("attention core %.3g: kept %d of %d selected cells (regions reaching the core level)",
                    core, int(mask.sum()), selected)
    frac = float(mask.double().mean())
    logger.info(
        "attention threshold %.3g -> cut %.6g (map range %.6g..%.6g): %d of %d cells selected (%.1f%%)",
        threshold, float(cut), float(a.min()), float(a.max()), int(mask.sum()), mask.numel(), 100 * frac,
    )
    return mask


def _neighbour_max(x: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Max of every cell and its 8 (3x3 window) or 4 (plus-shaped) neighbours; ``x`` is a float ``(h, w)`` grid."""
    if connectivity == 8:
        return torch.nn.functional.max_pool2d(x[None, None], 3, stride=1, padding=1)[0, 0]
    if connectivity != 4:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    rows = torch.nn.functional.max_pool2d(x[None, None], (3, 1), stride=1, padding=(1, 0))[0, 0]
    cols = torch.nn.functional.max_pool2d(x[None, None], (1, 3), stride=1, padding=(0, 1))[0, 0]
    return torch.maximum(rows, cols)


def grow_within(seeds: torch.Tensor, allowed: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """The cells of ``allowed`` connected (through ``allowed`` cells; 8- or 4-connectivity) to a cell of ``seeds``:
    ``(h, w)`` bool.

    Flood fill by repeated 3x3 dilation clipped to ``allowed``, until nothing changes (at most one pass per cell of
    the longest path, a few dozen on real maps)."""
    allowed = _as_tensor(allowed, "allowed").bool()
    grown = _as_tensor(seeds, "seeds").bool() & allowed
    while True:
        nxt = _neighbour_max(grown.float(), connectivity).bool() & allowed
        if torch.equal(nxt, grown):
            return grown
        grown = nxt


# ---------------------------------------------------------------------------------------------------------------
# automatic mask cleanup: holes and small regions (measured on the toy model, python -m editinfinity.evaluation.toy_eval --variant)


def connected_components(mask, connectivity: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Label the connected regions of a bool ``(h, w)`` mask without a per-cell loop.

    Every selected cell starts with its own label (flat index + 1); each pass gives every cell the largest label among
    itself and its selected neighbours, until nothing changes, so each region ends with the label of its last cell.

    Returns:
        ``labels`` int64 ``(h, w)`` (0 outside the mask, regions numbered ``1..n`` in order of their first cell) and
        ``sizes`` int64 ``(n,)``, the cell count of region ``i + 1``.
    """
    m = _as_tensor(mask, "mask").bool()
    h, w = m.shape
    # float64 holds every flat index of any grid exactly
    lab = torch.where(m, torch.arange(1, h * w + 1, dtype=torch.float64).reshape(h, w), 0.0)
    while True:
        nxt = torch.where(m, _neighbour_max(lab, connectivity), 0.0)
        if torch.equal(nxt, lab):
            break
        lab = nxt
    raw = lab.to(torch.int64).flatten()
    roots, inverse = torch.unique(raw, return_inverse=True)  # sorted: 0 (background) first when present
    if roots.numel() and roots[0] == 0:
        inverse = inverse - 1  # background -> -1, regions 0..n-1
    n = int((roots > 0).sum())
    # renumber by first cell in reading order
    first = torch.full((n,), h * w, dtype=torch.int64)
    sel = inverse >= 0
    first.scatter_reduce_(0, inverse[sel], torch.arange(h * w)[sel], reduce="amin")
    order = torch.empty(n, dtype=torch.int64)
    order[torch.argsort(first)] = torch.arange(n)
    labels = torch.zeros(h * w, dtype=torch.int64)
    labels[sel] = order[inverse[sel]] + 1
    sizes = torch.bincount(labels[sel] - 1, minlength=n) if n else torch.zeros(0, dtype=torch.int64)
    return labels.reshape(h, w), sizes


def fill_holes(mask) -> torch.Tensor:
    """``mask`` with every hole filled: unselected cells that cannot reach the grid's border through unselected
    cells (4-connectivity, the complement of the mask's 8-connected regions) become selected."""
    m = _as_tensor(mask, "mask").bool()
    border = torch.zeros_like(m)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    outside = grow_within(border & ~m, ~m, connectivity=4)
    return m | ~outside


def min_region_cells(grid, min_region: float) -> int:
    """Smallest region (in cells) the cleanup keeps on a ``grid = (h_K, w_K)`` grid: ``min_region`` is a fraction of
    the grid's cells, so the same setting removes the same share of the picture at every resolution."""
    n_h, n_w = _grid(grid)
    if not 0.0 <= float(min_region) < 1.0:
        raise ValueError(f"min_region must be a fraction of the grid in [0, 1), got {min_region!r}")
    return max(0, round(float(min_region) * n_h * n_w))


def remove_small_regions(mask, min_cells: int) -> torch.Tensor:
    """``mask`` without its 8-connected regions of fewer than ``min_cells`` cells. The largest region always stays
    (an automatic mask never becomes empty because of the cleanup)."""
    m = _as_tensor(mask, "mask").bool()
    if min_cells <= 1 or not m.any():
        return m.clone()
    labels, sizes = connected_components(m)
    keep = sizes >= min_cells
    keep[int(torch.argmax(sizes))] = True  # the first of the largest
    return torch.cat([torch.zeros(1, dtype=torch.bool), keep])[labels]


def clean_mask(mask, *, holes: bool = False, min_region: float = 0.0) -> torch.Tensor:
    """Automatic-mask cleanup: small regions removed (``min_region``, a fraction of the grid, see
    :func:`min_region_cells`), then holes filled (``holes``). Both off leaves the mask as it is (the reference)."""
    m = _as_tensor(mask, "mask").bool()
    before = int(m.sum())
    cells = min_region_cells(m.shape, min_region)
    out = remove_small_regions(m, cells) if cells > 1 else m.clone()
    if holes:
        out = fill_holes(out)
    if holes or cells > 1:
        logger.info("mask cleanup (holes %s, regions >= %d cells): %d -> %d cells", holes, cells, before,
                    int(out.sum()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# pixel mask -> cell fractions (docs/method.md, section 6)


def _overlap_matrix(size: int, n: int) -> torch.Tensor:
    """``(n, size)`` float64: overlap of cell ``i`` = ``[i*size/n, (i+1)*size/n)`` with pixel ``p``, in units of 1/n px.

    Integer arithmetic (scaled by ``n``) keeps every entry and every later sum an exact integer in float64.
    """
    i = torch.arange(n, dtype=torch.int64)[:, None]
    p = torch.arange(size, dtype=torch.int64)[None, :]
    lo = torch.maximum(i * size, p * n)
    hi = torch.minimum((i + 1) * size, (p + 1) * n)
    return (hi - lo).clamp_min(0).to(torch.float64)


def _exact_fractions(m: torch.Tensor, n_h: int, n_w: int) -> torch.Tensor:
    h, w = m.shape
    rows = _overlap_matrix(h, n_h)
    cols = _overlap_matrix(w, n_w)
    # Cell area in the scaled units is h * w (height h/n_h px * n_h, width w/n_w px * n_w).
    return (rows @ m @ cols.T) / float(h * w)


def _reference_edges(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = round(size / n)  # Python round (half to even), as the reference
    i = torch.arange(n, dtype=torch.int64)
    start = torch.clamp(i * block, max=size - 1)
    end = torch.clamp((i + 1) * block, max=size)
    end = torch.where(end <= start, start + 1, end)  # "at least one pixel"
    return start, end


def _reference_fractions(m: torch.Tensor, n_h: int, n_w: int) -> torch.Tensor:
    h, w = m.shape
    integral = torch.zeros(h + 1, w + 1, dtype=torch.float64)
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    r0, r1 = _reference_edges(h, n_h)
    c0, c1 = _reference_edges(w, n_w)
    total = (
        integral[r1[:, None], c1[None, :]] - integral[r0[:, None], c1[None, :]]
        - integral[r1[:, None], c0[None, :]] + integral[r0[:, None], c0[None, :]]
    )
    size = ((r1 - r0)[:, None] * (c1 - c0)[None, :]).to(torch.float64)
    return total / size


def cell_fractions_from_pixels(pixel_edit_mask, grid, *, partition: str = "exact") -> torch.Tensor:
    """Fraction of edit pixels inside every cell of a ``grid[0] x grid[1]`` partition of the mask.

    Args:
        pixel_edit_mask: ``(H, W)`` bool (``True`` = edit) or float coverage in ``[0, 1]`` (then the area-weighted
            mean is returned, e.g. a bool latent grid averaged over coarse blocks).
        grid: ``(rows, cols)`` of the partition, e.g. the final latent grid ``(h_K, w_K)`` or ``(4, 4)``.
        partition: ``"exact"`` (real-valued box edges, see the module docstring) or ``"reference"`` (the reference's
            ``round(H/N)``-pixel blocks, clipped at the border; identical to "exact" when N divides the size).

    Returns:
        ``(rows, cols)`` float64 tensor of fractions in ``[0, 1]``. With integer-sized blocks the values are the
        exactly rounded ``count / block_size`` the reference compares against its 0.2 threshold.
    """
    m = _as_tensor(pixel_edit_mask, "pixel_edit_mask").to(torch.float64)
    n_h, n_w = _grid(grid)
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"`pixel_edit_mask` is empty, shape {tuple(m.shape)}")
    if partition == "exact":
        return _exact_fractions(m, n_h, n_w)
    if partition == "reference":
        return _reference_fractions(m, n_h, n_w)
    raise ValueError(f"`partition` must be one of {PARTITIONS}, got {partition!r}")


def coarse_fractions(edit_values, blocks=COARSE_BLOCKS, *, partition: str = "exact") -> torch.Tensor:
    """Fraction of edit area in each of the ``4 x 4`` coarse blocks (the "large edit" test, docs/method.md section 6).

    ``edit_values`` is either the pixel edit mask (user masks: the reference counts pixels) or the bool latent grid
    (attention masks: the mean of the block's cells). Both are the same area partition, so one function serves.
    """
    return cell_fractions_from_pixels(edit_values, blocks, partition=partition)


# ---------------------------------------------------------------------------------------------------------------
# cell fractions -> keep weights (docs/method.md, section 6)


def city_block_distance(selected) -> torch.Tensor:
    """``(H, W)`` int64 L1 (city-block) distance from every cell to the nearest ``True`` cell of ``selected``.

    Exact separable transform: first the 1-D distance along each row, then ``min over rows r' of |r - r'| + that``.
    Both passes are broadcast minima (memory ``O(H W max(H, W))``, ~1 MB for a 64x64 grid). Cells of an empty
    selection get a distance larger than any in-grid distance (``H + W``).
    """
    sel = _as_tensor(selected, "selected").to(torch.bool)
    h, w = sel.shape
    inf = h + w  # larger than any in-grid distance (at most h + w - 2)
    cols = torch.arange(w, dtype=torch.int32)
    rows = torch.arange(h, dtype=torch.int32)
    seed = torch.where(sel, 0, inf).to(torch.int32)  # (h, w)
    # 1-D along rows: g[r, c] = min_c' |c - c'| + seed[r, c']
    g = ((cols[:, None] - cols[None, :]).abs()[None, :, :] + seed[:, None, :]).amin(dim=2)
    g = g.clamp_max(inf)
    # then along columns: d[r, c] = min_r' |r - r'| + g[r', c]
    d = ((rows[:, None] - rows[None, :]).abs()[:, :, None] + g[None, :, :]).amin(dim=1)
    return d.clamp_max(inf).to(torch.int64)


def selected_cells(fraction, threshold: float = 0.2) -> torch.Tensor:
    """Cells (or coarse blocks) counted as edited: edit fraction ``>= threshold`` (bool grid, the reference's
    ``coord64`` / ``coord4`` selection). :func:`smoothing_weights` selects with it."""
    return _as_tensor(fraction, "fraction") >= threshold


def smoothing_weights(
    cell_fraction,
    coarse_fraction,
    *,
    cell_threshold: float = 0.2,
    coarse_threshold: float = 0.2,
    large_edit_blocks: int = 6,
    zero_radius: int = 1,
    ramp_end: int = 4,
) -> torch.Tensor:
    """Keep weight ``W`` (1 = source) from fine-cell and coarse-block edit fractions (the kernel ``G``, METHOD §7).

    A cell is *selected* when its edit fraction is ``>= cell_threshold``; ``d`` = city-block distance to the nearest
    selected cell. ``W = 0`` for ``d <= zero_radius`` (the mask dilated by one cell). Small edit (fewer than
    ``large_edit_blocks`` coarse blocks with fraction ``>= coarse_threshold``): ``W`` rises linearly by
    ``1 / (ramp_end + 1 - zero_radius)`` per cell, i.e. 0.25, 0.5, 0.75 at ``d`` = 2, 3, 4 and 1 from ``d = 5``
    on (the reference's ``(d - 1) / 4`` then 1, ``generate_weighted_tensor.py``). Large edit: no transition band, ``W = 1`` beyond
    ``zero_radius``. No selected cell: ``W`` is all ones (the edit reproduces the source).

    Returns:
        ``(h_K, w_K)`` float32 tensor in ``[0, 1]``.
    """
    fine = _as_tensor(cell_fraction, "cell_fraction").to(torch.float64)
    coarse = _as_tensor(coarse_fraction, "coarse_fraction").to(torch.float64)
    if zero_radius < 0 or ramp_end < zero_radius:
        raise ValueError(
            f"need 0 <= `zero_radius` <= `ramp_end`, got zero_radius={zero_radius!r}, ramp_end={ramp_end!r}"
        )
    selected = selected_cells(fine, cell_threshold)
    n_sel = int(selected.sum())
    if n_sel == 0:
        logger.info("no cell reaches edit fraction %.3g: W = 1 everywhere (source kept)", cell_threshold)
        return torch.ones(fine.shape, dtype=torch.float32)
    n_coarse = int(selected_cells(coarse, coarse_threshold).sum())
    large = n_coarse >= large_edit_blocks
    d = city_block_distance(selected).to(torch.float64)
    if large:
        w = (d > zero_radius).to(torch.float64)
    else:
        w = ((d - zero_radius) / (ramp_end + 1 - zero_radius)).clamp(0.0, 1.0)
    logger.info(
        "smoothing weights: %d of %d cells selected, %d of %d coarse blocks -> %s; %d cells W=0, %d in (0,1)",
        n_sel, selected.numel(), n_coarse, coarse.numel(), "large edit (no ramp)" if large else "small edit (ramp)",
        int((w == 0).sum()), int(((w > 0) & (w < 1)).sum()),
    )
    return w.to(torch.float32)


#: Smoothing-band modes: "scaled" keeps the reference's band as a fraction of the image (1 and 4 cells of a 64-cell
#: side), "reference" keeps it in cells whatever the grid (docs/method.md, section 6).
BANDS = ("scaled", "reference")
#: The grid side the reference's distances (dilation 1, ramp to 4 cells) were made for (1024 px, 16 px per cell).
REFERENCE_GRID_SIDE = 64


def band_for_grid(grid, band: str = "scaled") -> dict[str, int]:
    """``zero_radius`` / ``ramp_end`` (in cells) of the smoothing band on a ``grid = (h_K, w_K)`` latent grid.

    The reference's band (dilation 1 cell, ramp to 4 cells) was made for its 64x64 grid. ``"scaled"`` keeps the
    ramp the same fraction of the image side, ``round(4 * max(h_K, w_K) / 64)`` cells (at least the one-cell
    dilation): identical at 64x64 (1M), 1 cell at 16x16 (0.06M), where a 4-cell ramp would regenerate a quarter of
    the picture around every edit. ``"reference"``: 1 and 4 cells on any grid.
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    if band == "reference":
        return {"zero_radius": 1, "ramp_end": 4}
    side = max(int(grid[0]), int(grid[1]))
    return {"zero_radius": 1, "ramp_end": max(1, round(4 * side / REFERENCE_GRID_SIDE))}


#: The band setting that tries every distinct band of :data:`BANDS` on the case's grid and keeps the edit the model
#: itself finds most likely (``editinfinity.edit.likelihood``).
AUTO_BAND = "auto"
#: Every value the band setting takes.
BAND_CHOICES = (*BANDS, AUTO_BAND)


def candidate_bands(grid, band: str = "scaled") -> list[str]:
    """The named bands an edit with ``band`` generates on ``grid``: ``[band]``, or for ``"auto"`` every band of
    :data:`BANDS` whose distances differ from those of an earlier one (on the reference's 64-cell grid ``scaled``
    equals ``reference``, so ``auto`` costs nothing there and is the published band)."""
    if band not in BAND_CHOICES:
        raise ValueError(f"band must be one of {BAND_CHOICES}, got {band!r}")
    if band != AUTO_BAND:
        return [band]
    out: list[str] = []
    for name in BANDS:
        if all(band_for_grid(grid, name) != band_for_grid(grid, b) for b in out):
            out.append(name)
    return out


def weights_from_edit_mask(edit_mask, **kwargs) -> torch.Tensor:
    """``W`` for a boolean edit mask already on the latent grid (attention masks): each cell's fraction is its own
    value, the coarse fraction the mean over the 4x4 block. ``kwargs`` go to :func:`smoothing_weights`."""
    m = _as_tensor(edit_mask, "edit_mask").to(torch.bool)
    return smoothing_weights(m.to(torch.float64), coarse_fractions(m), **kwargs)


def weights_from_pixel_mask(pixel_edit_mask, grid, *, partition: str = "exact", **kwargs) -> torch.Tensor:
    """``W`` for a pixel edit mask (user masks): fine fractions on ``grid``, coarse fractions from the pixels."""
    fine = cell_fractions_from_pixels(pixel_edit_mask, grid, partition=partition)
    coarse = coarse_fractions(pixel_edit_mask, partition=partition)
    return smoothing_weights(fine, coarse, **kwargs)
