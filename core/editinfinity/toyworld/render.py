"""Drawing a scene: the pixel masks of its shapes (with occlusion) and the RGB picture, optionally with noise."""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from .scene import PALETTE, Scene, Shape, _pixel_grid, _shape_on_grid


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
