"""The toy world: a seedable renderer, captions, edits and a model-free judge for flat-coloured shapes.

Official Infinity weights cannot be downloaded here, so the toy preset is trained on this synthetic world and
the CPU demo edits its pictures. A scene is a flat background of one palette colour with one or two flat shapes
(`circle`, `square`, `triangle`), each 20-45 % of the image width and fully inside the image; the second shape is
drawn on top of the first. Captions follow a fixed grammar, so they can be parsed back, and the analyser judges
pixels (rendered, VAE-reconstructed or generated) without any model.

Geometry: every shape is described by the centre ``(cx, cy)`` and the side ``size`` of its axis-aligned square
bounding box, in pixels. A circle fills the inscribed disc, a square the whole box, a triangle is isosceles and
points up (apex at the top centre, base along the bottom edge), so the fill ratios are 1, pi/4 and 1/2.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
import string
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 210, 50),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle")

MIN_SIZE_FRACTION = 0.20  # shape size (bounding-box side) as a fraction of the image width
MAX_SIZE_FRACTION = 0.45
MIN_VISIBLE_FRACTION = 0.75  # an occluded shape keeps at least this share of its own area visible
SAME_COLOUR_GAP_FRACTION = 0.04  # two shapes of one colour keep their boxes this far apart (of the width)
# Pixel noise std (0-255 units) suggested for training pictures; render() itself defaults to none.
DEFAULT_NOISE = 2.0

# Identical to editinfinity.models.text.STYLE_SUFFIX; repeated so the toy world has no torch/transformers import.
STYLE_SUFFIX = ", the language style of this prompt is"
CAPTION_WORDS: tuple[str, ...] = ("a", "and", "on", "background")
STYLE_WORDS: tuple[str, ...] = tuple(STYLE_SUFFIX.replace(",", " ").split())

# Analyser settings (fractions of the picture so that any size works).
MAX_COLOUR_DISTANCE = 80.0  # farther than this from every palette colour: unknown pixel
MIN_OBJECT_AREA_FRACTION = 0.006  # of width*height; the smallest legal shape shows about 0.015 * width**2
OPENING_RADIUS = 2  # removes thin blur/edge fringes of intermediate colours before components are taken

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Shape:
    """One flat-coloured shape: kind, palette colour name, bounding-box centre and side, in pixels."""

    kind: str
    colour: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Shape.kind {self.kind!r} is not one of {KINDS}")
        if self.colour not in PALETTE:
            raise ValueError(f"Shape.colour {self.colour!r} is not one of {COLOURS}")
        if not self.size > 0:
            raise ValueError(f"Shape.size must be positive, got {self.size}")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box in pixels (x1, y1 exclusive edges)."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """A picture of the world: background colour name, shapes in drawing order (last on top), pixel size."""

    background: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    width: int = 256
    height: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if self.background not in PALETTE:
            raise ValueError(f"Scene.background {self.background!r} is not one of {COLOURS}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Scene size must be positive, got {self.width}x{self.height}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (inverse of :meth:`from_dict`)."""
        return {
            "background": self.background,
            "shapes": [asdict(s) for s in self.shapes],
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Rebuild a scene written by :meth:`to_dict`."""
        return cls(
            background=data["background"],
            shapes=tuple(Shape(**s) for s in data["shapes"]),
            width=int(data["width"]),
            height=int(data["height"]),
        )


def _pixel_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable (1, W) and (H, 1) arrays."""
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    return xs, ys


def _shape_on_grid(
    kind: str, cx: float, cy: float, size: float, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Boolean coverage of pixel centres ``xs``/``ys`` (broadcastable) by one shape."""
    half = size / 2
    dx = xs - cx
    dy = ys - cy
    if kind == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if kind == "circle":
        return dx * dx + dy * dy <= half * half
    if kind == "triangle":
        depth = dy + half  # distance below the apex
        return (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def shape_mask(shape: Shape, width: int, height: int) -> np.ndarray:
    """Full (unoccluded) pixel mask of ``shape`` on a ``height`` x ``width`` picture."""
    xs, ys = _pixel_grid(width, height)
    return np.broadcast_to(
        _shape_on_grid(shape.kind, shape.cx, shape.cy, shape.size, xs, ys), (height, width)
    ).copy()


def render_mask(scene: Scene, index: int) -> np.ndarray:
    """Bool (H, W) mask of the visible pixels of ``scene.shapes[index]`` (shapes drawn later occlude it)."""
    if not -len(scene.shapes) <= index < len(scene.shapes):
        raise IndexError(f"shape index {index} out of range for a scene with {len(scene.shapes)} shape(s)")
    index %= len(scene.shapes)
    mask = shape_mask(scene.shapes[index], scene.width, scene.height)
    for later in scene.shapes[index + 1 :]:
        mask &= ~shape_mask(later, scene.width, scene.height)
    return mask


def _noise_seed(scene: Scene) -> int:
    return zlib.crc32(repr(scene).encode())


def render(scene: Scene, noise: float = 0.0, seed: int | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB picture.

    Shapes are aliased (pixel-centre coverage) so every interior pixel has the exact palette colour.
    ``noise`` is the std of additive gaussian pixel noise in 0-255 units; ``seed`` seeds it (None derives a
    seed from the scene, so the result is always a pure function of the arguments).
    """
    arr = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    arr[:] = PALETTE[scene.background]
    for shape in scene.shapes:
        arr[shape_mask(shape, scene.width, scene.height)] = PALETTE[shape.colour]
    if noise > 0:
        rng = np.random.default_rng(_noise_seed(scene) if seed is None else seed)
        noisy = arr.astype(np.float32) + rng.normal(0.0, noise, size=arr.shape).astype(np.float32)
        arr = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _boxes_gap(a: Shape, b: Shape) -> float:
    """Largest axis separation between the two bounding boxes (negative when they overlap)."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def scene_problems(scene: Scene) -> list[str]:
    """Every way ``scene`` breaks the world's rules (empty list: valid).

    Rules: 1 or 2 shapes; no shape has the background colour; size 20-45 % of the width; fully inside; each
    shape keeps >= ``MIN_VISIBLE_FRACTION`` of its area visible as one recognisable region; two shapes of the
    same colour stay ``SAME_COLOUR_GAP_FRACTION`` of the width apart (so they never merge into one region).
    """
    problems: list[str] = []
    w, h = scene.width, scene.height
    if not 1 <= len(scene.shapes) <= 2:
        problems.append(f"{len(scene.shapes)} shapes; the world has 1 or 2")
    eps = 1e-6
    for i, s in enumerate(scene.shapes):
        if s.colour == scene.background:
            problems.append(f"shape {i} has the background colour {s.colour}")
        if not MIN_SIZE_FRACTION * w - eps <= s.size <= MAX_SIZE_FRACTION * w + eps:
            problems.append(f"shape {i} size {s.size:.1f}px is outside 20-45 % of the width {w}")
        x0, y0, x1, y1 = s.bbox
        if x0 < -eps or y0 < -eps or x1 > w + eps or y1 > h + eps:
            problems.append(f"shape {i} box {tuple(round(v, 1) for v in s.bbox)} is not inside {w}x{h}")
    if problems:
        return problems
    min_area = MIN_OBJECT_AREA_FRACTION * w * h
    for i, s in enumerate(scene.shapes):
        full = shape_mask(s, w, h)
        visible = render_mask(scene, i)
        if visible.sum() < MIN_VISIBLE_FRACTION * full.sum():
            problems.append(f"shape {i} is less than {MIN_VISIBLE_FRACTION:.0%} visible")
        elif len(_object_cores(visible, min_area)) != 1:
            problems.append(f"shape {i} is not one recognisable region")
    for (i, a), (j, b) in itertools.combinations(enumerate(scene.shapes), 2):
        if a.colour == b.colour and _boxes_gap(a, b) < SAME_COLOUR_GAP_FRACTION * w:
            problems.append(f"shapes {i} and {j} share the colour {a.colour} and touch")
    return problems


def is_valid_scene(scene: Scene) -> bool:
    """True when :func:`scene_problems` finds nothing."""
    return not scene_problems(scene)


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _sample_shape(rng: np.random.Generator, width: int, height: int, colours: Sequence[str]) -> Shape:
    lo = MIN_SIZE_FRACTION * width
    hi = min(MAX_SIZE_FRACTION * width, float(height))
    size = float(rng.uniform(lo, hi))
    cx = float(rng.uniform(size / 2, width - size / 2))
    cy = float(rng.uniform(size / 2, height - size / 2))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    colour = colours[int(rng.integers(len(colours)))]
    # Round for readable JSON; keep the shape inside after rounding.
    size = math.floor(size * 100) / 100
    cx = min(max(round(cx, 2), size / 2), width - size / 2)
    cy = min(max(round(cy, 2), size / 2), height - size / 2)
    return Shape(kind, colour, cx, cy, size)


def sample_scene(
    rng: np.random.Generator | int | None = None,
    width: int = 256,
    height: int = 256,
    n_shapes: int | None = None,
    max_tries: int = 1000,
) -> Scene:
    """Draw a valid random scene. ``rng`` is a numpy Generator or a seed (same seed, same scene).

    ``n_shapes`` fixes the number of shapes (1 or 2); None picks either with equal probability.
    """
    if n_shapes not in (None, 1, 2):
        raise ValueError(f"n_shapes must be 1, 2 or None, got {n_shapes}")
    if height < MIN_SIZE_FRACTION * width:
        raise ValueError(f"a {width}x{height} picture is too flat for shapes of 20 % of its width")
    gen = _as_rng(rng)
    for _ in range(max_tries):
        background = COLOURS[int(gen.integers(len(COLOURS)))]
        shape_colours = [c for c in COLOURS if c != background]
        n = n_shapes if n_shapes is not None else int(gen.integers(1, 3))
        shapes = tuple(_sample_shape(gen, width, height, shape_colours) for _ in range(n))
        scene = Scene(background, shapes, width, height)
        if is_valid_scene(scene):
            return scene
    raise RuntimeError(f"no valid {width}x{height} scene after {max_tries} tries")


# ----------------------------------------------------------------------------------------------------------
# Captions


def caption(scene: Scene) -> str:
    """``a {colour} {shape} [and a {colour} {shape}] on a {colour} background``, shapes in drawing order."""
    if not scene.shapes:
        raise ValueError("a scene without shapes has no caption")
    objects = " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    return f"{objects} on a {scene.background} background"


@dataclass(frozen=True)
class CaptionAttributes:
    """What a caption says: background colour and the (colour, kind) of each object, in order."""

    background: str
    objects: tuple[tuple[str, str], ...]

    def describes(self, scene: Scene) -> bool:
        """True when ``scene`` has exactly these attributes in this order."""
        return self.background == scene.background and self.objects == tuple(
            (s.colour, s.kind) for s in scene.shapes
        )


def vocabulary() -> list[str]:
    """Every word the world's captions (and the language-style suffix) use, sorted."""
    return sorted(set(COLOURS) | set(KINDS) | set(CAPTION_WORDS) | set(STYLE_WORDS))


def parse_caption(text: str) -> CaptionAttributes:
    """Inverse of :func:`caption`. Case-insensitive; a trailing ``.`` or language-style suffix is ignored.

    Raises ValueError naming unknown words, or the expected grammar when the words are known but misplaced.
    """
    norm = " ".join(text.strip().lower().split())
    suffix = STYLE_SUFFIX.strip()
    if norm.endswith(suffix):
        norm = norm[: -len(suffix)].rstrip()
    norm = norm.rstrip(".").strip()
    words = norm.split()
    known = set(COLOURS) | set(KINDS) | set(CAPTION_WORDS)
    unknown = [w for w in words if w not in known]
    if unknown:
        raise ValueError(
            f"caption {text!r} has unknown word(s) {unknown}; the toy world knows colours {list(COLOURS)}, "
            f"shapes {list(KINDS)} and {list(CAPTION_WORDS)}"
        )
    grammar = "'a {colour} {shape} [and a {colour} {shape}] on a {colour} background'"
    objects: list[tuple[str, str]] = []
    pos = 0
    while True:
        chunk = words[pos : pos + 3]
        if len(chunk) != 3 or chunk[0] != "a" or chunk[1] not in PALETTE or chunk[2] not in KINDS:
            raise ValueError(f"caption {text!r} does not follow {grammar}")
        objects.append((chunk[1], chunk[2]))
        pos += 3
        if pos < len(words) and words[pos] == "and":
            pos += 1
            continue
        break
    tail = words[pos:]
    if (
        len(tail) != 4
        or tail[0] != "on"
        or tail[1] != "a"
        or tail[2] not in PALETTE
        or tail[3] != "background"
    ):
        raise ValueError(f"caption {text!r} does not follow {grammar}")
    if len(objects) > 2:
        raise ValueError(f"caption {text!r} names {len(objects)} objects; the world has 1 or 2")
    return CaptionAttributes(background=tail[2], objects=tuple(objects))


# ----------------------------------------------------------------------------------------------------------
# Edits


def edit_scene(scene: Scene, index: int, colour: str | None = None, kind: str | None = None) -> Scene:
    """Copy of ``scene`` whose shape ``index`` gets a new ``colour`` and/or ``kind`` (same place and size).

    Raises ValueError for an unknown or background colour, an unknown kind, or an edit that changes nothing.
    The result is not checked against the world's layout rules; see :func:`scene_problems`.
    """
    if not 0 <= index < len(scene.shapes):
        raise IndexError(f"shape index {index} out of range for a scene with {len(scene.shapes)} shape(s)")
    if colour is None and kind is None:
        raise ValueError("edit_scene needs a new colour or kind")
    old = scene.shapes[index]
    if colour is not None and colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    if colour is not None and colour == scene.background:
        raise ValueError(f"a shape cannot take the background colour {colour!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    new = replace(old, colour=colour or old.colour, kind=kind or old.kind)
    if new == old:
        raise ValueError(f"edit of shape {index} changes nothing ({old.colour} {old.kind})")
    shapes = list(scene.shapes)
    shapes[index] = new
    return replace(scene, shapes=tuple(shapes))


def make_edit_case(
    seed: int,
    width: int = 256,
    height: int = 256,
    noise: float = 0.0,
    attribute: str | None = None,
    max_tries: int = 1000,
) -> dict[str, Any]:
    """A deterministic editing case: change one object's colour or kind.

    Returns a dict with ``image`` (source picture), ``edited_image`` (the ideal result), ``prompt``,
    ``edit_prompt`` (the prompt with exactly the edited word replaced), ``target_word`` (a word that occurs
    once in the prompt and names the edited object: the edited attribute's word when unique, else the object's
    other word), ``source_scene``, ``edited_scene``, ``index``, ``attribute`` ("colour" | "kind"),
    ``old_value``, ``new_value`` and ``mask`` (bool (H, W): the object's visible pixels before or after the
    edit, i.e. the region that may change). ``attribute`` forces the kind of edit.
    """
    if attribute not in (None, "colour", "kind"):
        raise ValueError(f"attribute must be 'colour', 'kind' or None, got {attribute!r}")
    gen = np.random.default_rng([seed, 0x7E1D])
    for _ in range(max_tries):
        source = sample_scene(gen, width, height)
        index = int(gen.integers(len(source.shapes)))
        attr = attribute or ("colour", "kind")[int(gen.integers(2))]
        old_shape = source.shapes[index]
        if attr == "colour":
            options = [c for c in COLOURS if c not in (source.background, old_shape.colour)]
            new_value = options[int(gen.integers(len(options)))]
            edited = edit_scene(source, index, colour=new_value)
            old_value = old_shape.colour
        else:
            options = [k for k in KINDS if k != old_shape.kind]
            new_value = options[int(gen.integers(len(options)))]
            edited = edit_scene(source, index, kind=new_value)
            old_value = old_shape.kind
        if not is_valid_scene(edited):
            continue
        prompt = caption(source)
        words = prompt.split()
        other_value = old_shape.kind if attr == "colour" else old_shape.colour
        target = next((w for w in (old_value, other_value) if words.count(w) == 1), None)
        if target is None:
            continue
        mask = render_mask(source, index) | render_mask(edited, index)
        return {
            "image": render(source, noise=noise, seed=seed),
            "edited_image": render(edited),
            "prompt": prompt,
            "edit_prompt": caption(edited),
            "target_word": target,
            "source_scene": source,
            "edited_scene": edited,
            "index": index,
            "attribute": attr,
            "old_value": old_value,
            "new_value": new_value,
            "mask": mask,
        }
    raise RuntimeError(f"no valid edit case for seed {seed} after {max_tries} tries")


# ----------------------------------------------------------------------------------------------------------
# Analyser: pixels -> attributes, no model


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


# ----------------------------------------------------------------------------------------------------------
# Text side: tokenizer and a tiny T5 config


def _tokenizer_corpus(seed: int = 0) -> list[str]:
    """Training sentences: every one-object caption (with and without the style suffix), random word strings
    (so every word is seen in many contexts and becomes one piece), and ASCII characters (so typos and
    capitals tokenise to characters rather than <unk>)."""
    lines = []
    for bg in COLOURS:
        for c in COLOURS:
            for k in KINDS:
                lines.append(f"a {c} {k} on a {bg} background")
    lines += [line + STYLE_SUFFIX for line in lines]
    words = vocabulary()
    rnd = random.Random(seed)
    lines += [" ".join(rnd.choice(words) for _ in range(8)) for _ in range(3000)]
    chars = string.ascii_letters + string.digits + ".,;:!?'\"-()/&"
    lines += [" ".join(chars)] * 20
    return lines


def _proto_fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """Top-level (field number, wire type, value) of a protobuf message; enough to read a SentencePiece model
    without the protobuf package (an optional dependency whose version must match sentencepiece's)."""
    fields: list[tuple[int, int, bytes | int]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, wire, varint()))
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            fields.append((number, wire, data[pos : pos + size]))
            pos += size
        elif wire == 2:
            size = varint()
            fields.append((number, wire, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
    return fields


def _precompiled_charsmap(model_bytes: bytes) -> bytes | None:
    """``ModelProto.normalizer_spec.precompiled_charsmap`` (fields 3 and 2) of a serialised SentencePiece model."""
    for number, wire, value in _proto_fields(model_bytes):
        if number == 3 and wire == 2:
            for sub_number, sub_wire, sub_value in _proto_fields(bytes(value)):  # type: ignore[arg-type]
                if sub_number == 2 and sub_wire == 2:
                    return bytes(sub_value)  # type: ignore[arg-type]
    return None


def build_tokenizer(out_dir: str | Path, vocab_size: int = 128) -> Path:
    """Train a SentencePiece unigram model on the world's words and save a T5 tokenizer directory.

    Writes ``spiece.model``, ``tokenizer.json`` and ``tokenizer_config.json`` so that
    ``AutoTokenizer.from_pretrained(out_dir, legacy=True)`` works offline. Ids: <pad>=0, </s>=1, <unk>=2;
    every encoding ends with </s>; no sentinel (extra_id) tokens. Single-threaded with a fixed seed, so the
    files are byte-identical across runs. ``vocab_size`` is a soft limit (the tiny corpus yields ~115 pieces).
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    model_bytes = buf.getvalue()
    model_path = out / "spiece.model"
    model_path.write_bytes(model_bytes)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = [
        (processor.id_to_piece(i), float(processor.get_score(i))) for i in range(processor.get_piece_size())
    ]
    tokenizer = T5Tokenizer(
        vocab=vocab,
        extra_ids=0,
        _spm_precompiled_charsmap=_precompiled_charsmap(model_bytes),
        legacy=True,
        model_max_length=512,
        vocab_file=str(model_path),
    )
    tokenizer.save_pretrained(str(out))
    logger.info("toy tokenizer with %d pieces written to %s", len(tokenizer), out)
    return out


def tiny_t5_config(vocab_size: int, d_model: int = 128, num_layers: int = 2, num_heads: int = 4) -> Any:
    """A small ``transformers.T5Config`` (T5 v1.1 style, gated-gelu) for a randomly initialised text encoder."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


__all__ = [
    "CAPTION_WORDS",
    "COLOURS",
    "DEFAULT_NOISE",
    "KINDS",
    "PALETTE",
    "STYLE_SUFFIX",
    "CaptionAttributes",
    "Scene",
    "Shape",
    "analyse",
    "attribute_present",
    "build_tokenizer",
    "caption",
    "edit_scene",
    "is_valid_scene",
    "label_components",
    "make_edit_case",
    "matches",
    "parse_caption",
    "quantise",
    "render",
    "render_mask",
    "sample_scene",
    "scene_problems",
    "shape_mask",
    "tiny_t5_config",
    "vocabulary",
]
