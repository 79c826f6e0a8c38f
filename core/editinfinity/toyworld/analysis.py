"""The model-free judge: pixels -> palette colours -> objects (colour, kind, place), compared with a scene."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from PIL import Image

from .scene import COLOURS, KINDS, PALETTE, Scene, Shape, _shape_on_grid

# Analyser settings (fractions of the picture so that any size works).
MAX_COLOUR_DISTANCE = 80.0  # farther than this from every palette colour: unknown pixel
MIN_OBJECT_AREA_FRACTION = 0.006  # of width*height; the smallest legal shape shows about 0.015 * width**2
OPENING_RADIUS = 2  # removes thin blur/edge fringes of intermediate colours before components are taken

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in 0-255 from a PIL image or a uint8/float array (floats <= 1 are taken as 0-1)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) picture, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if arr.size and arr.max() <= 1.0 and not np.issubdtype(np.asarray(image).dtype, np.integer):
        arr = arr * 255.0
    return arr


_LUT_BITS = 6  # palette lookup on 6 bits per channel: at most 2 levels of rounding, far below any margin
_lut_cache: list[np.ndarray] = []


def _palette_lut() -> np.ndarray:
    """Palette index (or -1) for every 6-bit-per-channel colour, built once (262144 entries)."""
    if not _lut_cache:
        step = 1 << (8 - _LUT_BITS)
        levels = np.arange(1 << _LUT_BITS, dtype=np.float32) * step + (step - 1) / 2
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
        d2 = ((grid[:, None, :] - _PALETTE_ARRAY[None]) ** 2).sum(-1)
        idx = d2.argmin(1)
        far = d2[np.arange(len(idx)), idx] > MAX_COLOUR_DISTANCE**2
        _lut_cache.append(np.where(far, -1, idx).astype(np.int8))
    return _lut_cache[0]


def quantise(image: Image.Image | np.ndarray) -> np.ndarray:
    """Palette index of every pixel (int8 (H, W)); -1 where no palette colour is within MAX_COLOUR_DISTANCE."""
    arr = np.clip(np.rint(_to_array(image)), 0, 255).astype(np.int32) >> (8 - _LUT_BITS)
    code = (arr[..., 0] << (2 * _LUT_BITS)) | (arr[..., 1] << _LUT_BITS) | arr[..., 2]
    return _palette_lut()[code]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, separable shifts; outside the array counts as False."""
    rows = mask.copy()
    for s in range(1, r + 1):
        rows[s:] |= mask[:-s]
        rows[:-s] |= mask[s:]
    out = rows.copy()
    for s in range(1, r + 1):
        out[:, s:] |= rows[:, :-s]
        out[:, :-s] |= rows[:, s:]
    return out


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square; outside the array counts as False."""
    if r <= 0:
        return mask.copy()
    return ~_dilate(~np.pad(mask, r), r)[r:-r, r:-r]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: (labels int32 (H, W), 0 = outside, 1..n; n).

    Run-length union-find: Python work grows with the number of runs, not pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    start_r, start_c = np.nonzero(d == 1)
    end_r, end_c = np.nonzero(d == -1)
    n_runs = len(start_r)
    if n_runs == 0:
        return np.zeros((h, w), dtype=np.int32), 0
    parent = list(range(n_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_bounds = np.searchsorted(start_r, np.arange(h + 1)).tolist()
    sc, ec = start_c.tolist(), end_c.tolist()
    for y in range(h - 1):
        i, i_end = row_bounds[y], row_bounds[y + 1]
        j, j_end = row_bounds[y + 1], row_bounds[y + 2]
        while i < i_end and j < j_end:
            if sc[i] < ec[j] and sc[j] < ec[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if ec[i] < ec[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n_runs)])
    _, comp = np.unique(roots, return_inverse=True)
    comp = comp.astype(np.int64) + 1
    marker = np.zeros(h * w + 1, dtype=np.int64)
    np.add.at(marker, start_r * w + start_c, comp)
    np.add.at(marker, end_r * w + end_c, -comp)
    labels = np.cumsum(marker[:-1]).reshape(h, w).astype(np.int32)
    return labels, int(comp.max())


def _object_cores(mask: np.ndarray, min_area: float) -> list[np.ndarray]:
    """Regions of one colour that are objects: opened (fringes removed), connected, large enough.

    Each region is grown back by the opening radius inside its own unopened component of ``mask``. (Growing
    further would pull in fringes: a white-on-black edge blurs to gray.) A triangle's apex may stay trimmed;
    the square box fit below does not depend on it.
    """
    if mask.sum() < min_area:
        return []
    # Work inside the mask's bounding box (+ margin): morphology and labelling then touch only the object area.
    h, w = mask.shape
    margin = 2 * OPENING_RADIUS + 2
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    oy0, oy1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, h)
    ox0, ox1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, w)
    sub = mask[oy0:oy1, ox0:ox1]
    eroded = _erode(sub, OPENING_RADIUS)
    if eroded.sum() < 0.5 * min_area:
        return []
    core = _dilate(eroded, OPENING_RADIUS) & sub
    core_labels, n = label_components(core)
    full_labels, _ = label_components(sub)
    grow = OPENING_RADIUS + 1
    areas = np.bincount(core_labels.ravel(), minlength=n + 1)
    regions: list[np.ndarray] = []
    for k in range(1, n + 1):
        if areas[k] < 0.5 * min_area:
            continue
        comp = core_labels == k
        local = np.isin(full_labels, np.unique(full_labels[comp])) & _dilate(comp, grow)
        if local.sum() < min_area:
            continue
        region = np.zeros_like(mask)
        region[oy0:oy1, ox0:ox1] = local
        regions.append(region)
    return regions


def _fit_shape(region: np.ndarray, dont_care: np.ndarray) -> dict[str, Any]:
    """Best (kind, square box) for a visible region; ``dont_care`` marks other objects' pixels.

    The box side is the longer side of the region's bounding box; when the region is narrower in one
    direction (part hidden under another object) the box is tried flush left, right or centred (up, down,
    centred). Each template scores the mean of its plain IoU and its IoU with ``dont_care`` pixels ignored.
    """
    h, w = region.shape
    ys, xs = np.nonzero(region)
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    bw, bh = x1 - x0, y1 - y0
    side = float(max(bw, bh))
    x_opts = sorted({float(x0), x1 - side, x0 - (side - bw) / 2})
    y_opts = sorted({float(y0), y1 - side, y0 - (side - bh) / 2})
    wx0 = max(int(math.floor(min(x_opts))) - 2, 0)
    wx1 = min(int(math.ceil(max(x_opts) + side)) + 2, w)
    wy0 = max(int(math.floor(min(y_opts))) - 2, 0)
    wy1 = min(int(math.ceil(max(y_opts) + side)) + 2, h)
    v = region[wy0:wy1, wx0:wx1]
    hidden = dont_care[wy0:wy1, wx0:wx1] & ~v
    gx = np.arange(wx0, wx1, dtype=np.float64)[None, :] + 0.5
    gy = np.arange(wy0, wy1, dtype=np.float64)[:, None] + 0.5
    best: dict[str, Any] = {}
    scores = dict.fromkeys(KINDS, 0.0)
    for bx, by in itertools.product(x_opts, y_opts):
        cx, cy = bx + side / 2, by + side / 2
        for kind in KINDS:
            t = _shape_on_grid(kind, cx, cy, side, gx, gy)
            inter = int((t & v).sum())
            union = int((t | v).sum())
            if not union:
                continue
            # Mean of the plain IoU (the region is the whole shape: right when it lies on top) and the IoU
            # that ignores other objects' pixels (right when it lies underneath): a shape on top of another
            # is not mistaken for any template that merely fits under the other object.
            iou = 0.5 * (inter / union + inter / max(union - int((t & hidden).sum()), 1))
            if iou > scores[kind]:
                scores[kind] = iou
            if not best or iou > best["iou"]:
                best = {"kind": kind, "iou": iou, "cx": cx, "cy": cy, "size": side}
    best["scores"] = {k: round(s, 4) for k, s in scores.items()}
    best["bbox"] = (x0, y0, x1, y1)
    best["fill_ratio"] = float(region.sum()) / float(bw * bh)
    return best


def _background(labels: np.ndarray, arr: np.ndarray) -> int:
    """Palette index of the background: the most common palette colour on a 2-pixel border."""
    border = np.concatenate(
        [labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()]
    )
    border = border[border >= 0]
    if border.size:
        return int(np.bincount(border, minlength=len(COLOURS)).argmax())
    edge = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3)])
    med = np.median(edge, axis=0)
    return int(((_PALETTE_ARRAY - med) ** 2).sum(-1).argmin())


def _compare(analysis: dict[str, Any], scene: Scene) -> dict[str, Any]:
    """Assign detected objects to the scene's shapes (attributes first, then distance) and judge each."""
    sx = analysis["width"] / scene.width
    sy = analysis["height"] / scene.height
    detected = analysis["objects"][:6]
    expected = list(scene.shapes)
    slots = list(range(len(detected))) + [None] * len(expected)

    def cost(e: Shape, d: dict[str, Any] | None) -> float:
        if d is None:
            return 10.0
        dist = math.hypot(d["centre"][0] - e.cx * sx, d["centre"][1] - e.cy * sy) / analysis["width"]
        return (e.colour != d["colour"]) * 2.0 + (e.kind != d["kind"]) * 2.0 + dist

    best_perm: tuple[int | None, ...] = ()
    best_cost = math.inf
    for perm in itertools.permutations(slots, len(expected)):
        if any(p is not None and perm.count(p) > 1 for p in perm):
            continue
        c = sum(cost(e, detected[p] if p is not None else None) for e, p in zip(expected, perm, strict=True))
        if c < best_cost:
            best_cost, best_perm = c, perm
    per_object = []
    for i, (e, p) in enumerate(zip(expected, best_perm, strict=True)):
        d = detected[p] if p is not None else None
        per_object.append(
            {
                "index": i,
                "colour": e.colour,
                "kind": e.kind,
                "found": d is not None,
                "detected_colour": d["colour"] if d else None,
                "detected_kind": d["kind"] if d else None,
                "colour_ok": bool(d and d["colour"] == e.colour),
                "kind_ok": bool(d and d["kind"] == e.kind),
                "centre_error": (
                    math.hypot(d["centre"][0] / sx - e.cx, d["centre"][1] / sy - e.cy) / scene.width
                    if d
                    else None
                ),
            }
        )
    background_ok = analysis["background"] == scene.background
    extra = len(analysis["objects"]) - sum(o["found"] for o in per_object)
    ok = background_ok and extra == 0 and all(o["colour_ok"] and o["kind_ok"] for o in per_object)
    return {"background_ok": background_ok, "objects": per_object, "extra_objects": extra, "matches": ok}


def analyse(image: Image.Image | np.ndarray, expected_scene: Scene | None = None) -> dict[str, Any]:
    """Judge a picture without a model.

    Pixels are snapped to the nearest palette colour (unknown when far from all). The background is the most
    common colour on the border. Every other colour's mask is opened (removing blur fringes), split into
    connected regions, and regions larger than ``MIN_OBJECT_AREA_FRACTION`` of the picture become objects,
    each classified by the best-fitting template (circle, square, upward triangle) in a square box, ignoring
    pixels of other objects (occlusion). Returns ``{"width", "height", "background", "objects": [{"colour",
    "kind", "area", "bbox", "centre", "size", "fill_ratio", "kind_iou", "kind_scores"}], ...}``, objects
    largest first; with ``expected_scene`` also ``"expected"`` (per-object verdicts and ``"matches"``).
    """
    arr = _to_array(image)
    h, w = arr.shape[:2]
    labels = quantise(arr)
    bg = _background(labels, arr)
    min_area = MIN_OBJECT_AREA_FRACTION * w * h
    not_background = labels != bg
    objects: list[dict[str, Any]] = []
    for ci, name in enumerate(COLOURS):
        if ci == bg:
            continue
        for region in _object_cores(labels == ci, min_area):
            fit = _fit_shape(region, not_background & ~region)
            objects.append(
                {
                    "colour": name,
                    "kind": fit["kind"],
                    "area": int(region.sum()),
                    "bbox": fit["bbox"],
                    "centre": (round(fit["cx"], 2), round(fit["cy"], 2)),
                    "size": fit["size"],
                    "fill_ratio": round(fit["fill_ratio"], 4),
                    "kind_iou": round(fit["iou"], 4),
                    "kind_scores": fit["scores"],
                }
            )
    objects.sort(key=lambda o: -o["area"])
    result: dict[str, Any] = {"width": w, "height": h, "background": COLOURS[bg], "objects": objects}
    if expected_scene is not None:
        result["expected"] = _compare(result, expected_scene)
    return result


def matches(image: Image.Image | np.ndarray, scene: Scene, position_tolerance: float | None = None) -> bool:
    """True when the picture shows exactly ``scene``'s background and objects (colour and kind of each).

    ``position_tolerance`` (fraction of the width) also bounds each object's centre error.
    """
    verdict = analyse(image, scene)["expected"]
    if not verdict["matches"]:
        return False
    if position_tolerance is not None:
        return all(o["centre_error"] <= position_tolerance for o in verdict["objects"])
    return True


def attribute_present(
    image: Image.Image | np.ndarray, colour: str | None = None, kind: str | None = None
) -> bool:
    """True when some object in the picture has ``colour`` and ``kind`` (None matches anything)."""
    if colour is not None and colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return any(
        (colour is None or o["colour"] == colour) and (kind is None or o["kind"] == kind)
        for o in analyse(image)["objects"]
    )
