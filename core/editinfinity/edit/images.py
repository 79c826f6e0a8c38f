"""Reading source images and the one image preprocessing every stage uses.

One preprocessing for every stage (docs/method.md, "Preparing the case"): RGB, aspect-preserving *cover* resize with
LANCZOS, then a centre crop to the schedule's pixel size. The resize uses exact integer arithmetic for the other side
(``floor(W * h / w)``), which equals the reference's ``int(W / (w / h))`` except where the reference's float
division falls just below an integer (it would then crop one row short).

Deviation from the reference: EXIF orientation tags are applied (``ImageOps.exif_transpose``), so images are used
as every viewer shows them; the reference ignores the tag.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from editinfinity.errors import InvalidCaseError
from editinfinity.models import schedules

logger = logging.getLogger(__name__)


#: Aspect ratios up to 20 % beyond the extreme templates (1/3 .. 3) are accepted (and cropped to the template).
ASPECT_SLACK = 1.2

_TRUNCATION_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------
# reading image files


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even if someone enabled ``ImageFile.LOAD_TRUNCATED_IMAGES``."""
    with _TRUNCATION_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def open_fully(path, what: str, field_name: str) -> Image.Image:
    """Open and fully decode an image file; every failure becomes an :class:`InvalidCaseError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise InvalidCaseError(f"{what} file not found: {p} (field `{field_name}`); check the path")
    if p.is_dir():
        raise InvalidCaseError(f"{what} path {p} (field `{field_name}`) is a directory; give the image file itself")
    try:
        with _strict_truncation(), Image.open(p) as img:
            img.load()  # decode every byte now: a truncated JPEG fails here, not later in a stage
            return ImageOps.exif_transpose(img)  # a new image, independent of the closed file
    except UnidentifiedImageError as e:
        raise InvalidCaseError(
            f"{what} file {p} (field `{field_name}`) is not an image PIL can read; save it as PNG or JPEG"
        ) from e
    except Image.DecompressionBombError as e:
        raise InvalidCaseError(
            f"{what} file {p} (field `{field_name}`) is too large to decode safely ({e}); downscale it first"
        ) from e
    except PermissionError as e:
        raise InvalidCaseError(f"{what} file {p} (field `{field_name}`) cannot be read: permission denied") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        hint = "truncated or corrupt" if "truncat" in str(e).lower() else "unreadable"
        raise InvalidCaseError(
            f"{what} file {p} (field `{field_name}`) is {hint} ({e}); re-export or re-download it"
        ) from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(to_uint8(img))  # 2-D uint8 -> mode L
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is then dropped below
    return img.convert("RGB")


def to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit values of a single-channel 16-bit / 32-bit / float image (float in [0, 1] or integers up to 65535)."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0
    elif a.size and a.max() > 255:
        a = a / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def load_image(path) -> Image.Image:
    """Load an image file as a fully decoded RGB PIL image (EXIF orientation applied).

    Raises:
        InvalidCaseError: missing file, directory, not an image, truncated/corrupt file, unreadable file.
    """
    img = open_fully(path, "image", "image")
    out = _to_rgb(img)
    out.filename = str(path)  # keep the name for later messages (convert() drops it)
    return out


# ---------------------------------------------------------------------------------------------------------------
# schedule choice and preprocessing


def _size_hw(img_or_size) -> tuple[int, int]:
    if isinstance(img_or_size, Image.Image):
        w, h = img_or_size.size
        return h, w
    h, w = (int(v) for v in img_or_size)
    return h, w


def _name(img, source) -> str:
    name = source if source is not None else getattr(img, "filename", None)
    return f"image {name}" if name else "the image"


def choose_schedule(img, resolution: str = "1M", *, source=None) -> schedules.Schedule:
    """The scale schedule of the aspect template nearest to the image, at pixel budget ``resolution``.

    Args:
        img: PIL image or its ``(H, W)``.
        resolution: pixel budget, one of ``schedules.BUDGETS`` (0.06M, 0.25M, 0.60M, 1M).
        source: name used in error messages (defaults to the image's file name).

    Raises:
        InvalidCaseError: unknown budget; aspect ratio more than 20 % beyond the extreme templates; image too small
            for the chosen grid (see :func:`preprocess_image`).
    """
    if resolution not in schedules.BUDGETS:
        raise InvalidCaseError(
            f"unknown `resolution` {resolution!r}; choose one of {', '.join(schedules.BUDGETS)}"
        )
    h, w = _size_hw(img)
    if h < 1 or w < 1:
        raise InvalidCaseError(f"{_name(img, source)} is empty ({w}x{h} px)")
    ratio = h / w
    lo, hi = min(schedules.TEMPLATES), max(schedules.TEMPLATES)
    lo_ok, hi_ok = lo / ASPECT_SLACK, hi * ASPECT_SLACK
    if not lo_ok <= ratio <= hi_ok:
        raise InvalidCaseError(
            f"{_name(img, source)} is {w}x{h} px (W x H): height/width ratio {ratio:.3f} is outside the supported "
            f"range {lo_ok:.3f}..{hi_ok:.2f} (aspect templates 1/3..3, plus 20 %); crop it closer to one of the "
            f"templates {', '.join(f'{r:g}' for r in sorted(schedules.TEMPLATES))}"
        )
    schedule = schedules.get_schedule(ratio, resolution)
    _check_large_enough(h, w, schedule, img, source)
    template = schedules.template_of(schedule)
    if abs(template - ratio) / ratio > 0.01:
        logger.info("%s: ratio %.3f -> template %g; the centre crop drops part of the picture",
                    _name(img, source), ratio, template)
    return schedule


def _check_large_enough(h: int, w: int, schedule, img=None, source=None) -> None:
    """At most 16x upscaling, i.e. at least one source pixel per latent cell of the final grid."""
    h_k, w_k = schedules.last_grid(schedule)
    if h >= h_k and w >= w_k:
        return
    smallest_budget = min(schedules.BUDGETS, key=schedules.BUDGETS.get)
    smallest = schedules.last_grid(schedules.get_schedule(h_k / w_k, smallest_budget))
    big_h, big_w = schedules.pixel_size(schedule)
    raise InvalidCaseError(
        f"{_name(img, source)} is {w}x{h} px (W x H), smaller than the final latent grid of this schedule "
        f"({w_k}x{h_k} cells for {big_w}x{big_h} px): it needs at least {w_k}x{h_k} px (one source pixel per latent "
        f"cell). Use a larger image or a smaller `resolution` (the smallest budget needs at least "
        f"{smallest[1]}x{smallest[0]} px at this aspect ratio)"
    )


def cover_geometry(src_hw, dst_hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resized size ``(rh, rw)`` that covers ``dst_hw`` preserving ``src_hw``'s aspect, and the centre-crop offset
    ``(top, left)`` into it (exact integer arithmetic; see the module docstring)."""
    h0, w0 = (int(v) for v in src_hw)
    big_h, big_w = (int(v) for v in dst_hw)
    if w0 * big_h <= big_w * h0:  # relatively taller than the target: match the width
        rw, rh = big_w, max(big_h, (big_w * h0) // w0)
    else:
        rh, rw = big_h, max(big_w, (big_h * w0) // h0)
    return (rh, rw), ((rh - big_h) // 2, (rw - big_w) // 2)


def cover_resize_crop(img: Image.Image, dst_hw, resample) -> Image.Image:
    (rh, rw), (top, left) = cover_geometry((img.height, img.width), dst_hw)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), resample=resample)
    big_h, big_w = (int(v) for v in dst_hw)
    if (rw, rh) != (big_w, big_h):
        img = img.crop((left, top, left + big_w, top + big_h))
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in ``[-1, 1]``: ``x / 255`` then ``x + x - 1`` (the reference's exact arithmetic)."""
    arr = np.asarray(_to_rgb(img), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255)
    return x.add(x).add_(-1).unsqueeze(0)


def preprocess_image(img: Image.Image, schedule, *, source=None) -> tuple[torch.Tensor, Image.Image]:
    """The one preprocessing used by every stage: RGB, LANCZOS cover-resize, centre crop to the schedule's size.

    Returns:
        ``(tensor (1, 3, H, W) float32 in [-1, 1], PIL RGB image holding exactly those pixels)`` with
        ``(H, W) = schedules.pixel_size(schedule)``.

    Raises:
        InvalidCaseError: the image is smaller than the schedule's final latent grid (more than 16x upscaling).
    """
    big_h, big_w = schedules.pixel_size(schedule)
    _check_large_enough(img.height, img.width, schedule, img, source)
    out = cover_resize_crop(_to_rgb(img), (big_h, big_w), Image.LANCZOS)
    (rh, rw), _ = cover_geometry((img.height, img.width), (big_h, big_w))
    kept = (big_h * big_w) / (rh * rw)
    if kept < 0.9:
        logger.warning("%s: the centre crop to %dx%d keeps only %.0f%% of the picture",
                       _name(img, source), big_w, big_h, 100 * kept)
    return image_to_tensor(out), out


def image_digest(image) -> str:
    """sha256 of the image's RGB pixels and size (two encodings of the same pixels share a digest): the identity of
    an input image for learned state and caches."""
    import hashlib

    img = load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    h = hashlib.sha256(f"{img.width}x{img.height}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()
