"""The toy world's objects: the palette, the shape kinds, :class:`Shape` and :class:`Scene`, and the geometry of
a shape (which pixel centres it covers).

Every shape is described by the centre ``(cx, cy)`` and the side ``size`` of its axis-aligned square bounding box,
in pixels. A circle fills the inscribed disc, a square the whole box, a triangle is isosceles and points up (apex
at the top centre, base along the bottom edge), so the fill ratios are 1, pi/4 and 1/2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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
