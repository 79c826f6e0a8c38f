"""The world's layout rules, seeded random scenes and edit cases (one object's colour or kind changed)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .analysis import MIN_OBJECT_AREA_FRACTION, _object_cores
from .captions import caption
from .render import render, render_mask, shape_mask
from .scene import (
    COLOURS,
    KINDS,
    MAX_SIZE_FRACTION,
    MIN_SIZE_FRACTION,
    MIN_VISIBLE_FRACTION,
    PALETTE,
    SAME_COLOUR_GAP_FRACTION,
    Scene,
    Shape,
)


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
