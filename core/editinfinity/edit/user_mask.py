"""User masks: reading a mask file, its polarity, and its alignment with the preprocessed image.

White = edit by default (as diffusers' inpainting), ``black-edit`` for the reference's files (its ``mask.png`` is
black = edit). Grey levels: a pixel is *dark* iff its 8-bit luminance is ``<= 128`` (the reference's rule), *light*
otherwise. Colour images use PIL's ``L`` conversion (ITU-R 601-2 luma). Transparent pixels (alpha < 128) are
background (keep) whatever their colour, so a cut-out drawn on a transparent layer works with either polarity. The
mask is aligned with the same cover-resize + centre-crop geometry as the image (``images``), so a mask drawn on the
original picture (or a scaled copy of it) covers the same content after preprocessing. EXIF orientation tags are
applied, as for images.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image

from editinfinity.edit.images import cover_resize_crop, open_fully, to_uint8
from editinfinity.edit.mask import PARTITIONS, cell_fractions_from_pixels
from editinfinity.edit.modes import MASK_POLARITIES
from editinfinity.errors import InvalidCaseError

logger = logging.getLogger(__name__)


#: 8-bit luminance at or below which a mask pixel is dark (the reference's ``> 128`` = light rule).
DARK_MAX = 128
#: The fraction of the image an edit region may cover before we warn that the polarity may be inverted.
_MOSTLY_EDIT = 0.5


# ---------------------------------------------------------------------------------------------------------------
# user masks


def _check_polarity(polarity: str) -> None:
    if polarity not in MASK_POLARITIES:
        raise InvalidCaseError(f"`mask_polarity` must be one of {', '.join(MASK_POLARITIES)}, got {polarity!r}")


def _mask_planes(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(dark, opaque) bool planes of a mask image of any mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        lum = to_uint8(img)
        alpha = None
    else:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La")
        alpha = np.asarray(img.getchannel("A")) if has_alpha else None
        lum = np.asarray(img.convert("L"))  # drops alpha, as the reference's convert('L')
    dark = lum <= DARK_MAX
    opaque = np.ones_like(dark) if alpha is None else alpha >= 128
    return dark, opaque


def read_mask(path, polarity: str = "white-edit") -> np.ndarray:
    """The user mask at its own size as a bool edit mask (``True`` = edit), without alignment or validation.

    ``white-edit``: light pixels (luminance > 128) are edited; ``black-edit``: dark pixels (<= 128) are edited.
    Transparent pixels (alpha < 128) are never edited.
    """
    _check_polarity(polarity)
    dark, opaque = _mask_planes(open_fully(path, "mask", "mask"))
    edit = dark if polarity == "black-edit" else ~dark
    return edit & opaque


def align_mask(edit_mask: np.ndarray, image_size) -> np.ndarray:
    """Map a bool mask onto the preprocessed image: same cover-resize + centre-crop geometry as the image.

    The binary mask is resized as an 8-bit picture (LANCZOS, like the image) and cut at 50 % coverage, which keeps
    the edge where it lies in the source to sub-pixel accuracy in both directions; same size is returned as is.
    """
    m = np.asarray(edit_mask, dtype=bool)
    big_h, big_w = (int(v) for v in image_size)
    if m.shape == (big_h, big_w):
        return m.copy()
    pic = Image.fromarray(m.astype(np.uint8) * 255)  # 2-D uint8 -> mode L
    out = cover_resize_crop(pic, (big_h, big_w), Image.LANCZOS)
    return np.asarray(out) >= 128


def _other(polarity: str) -> str:
    return MASK_POLARITIES[1 - MASK_POLARITIES.index(polarity)]


def _mask_problem(edit: np.ndarray, fractions: torch.Tensor, cell_threshold: float) -> tuple[str, str] | None:
    """``(kind, description)`` of why a mask is unusable (kind "nothing" or "everything"), or None if usable."""
    n = int(edit.sum())
    if n == 0:
        return "nothing", "marks no pixel for editing"
    if n == edit.size:
        return "everything", "marks every pixel for editing, so nothing of the source would be kept"
    sel = fractions >= cell_threshold
    if not bool(sel.any()):
        return "nothing", (f"marks only {100 * n / edit.size:.2f}% of the image, and no latent cell is at least "
                           f"{100 * cell_threshold:.0f}% covered, so nothing would be edited")
    if bool(sel.all()):
        return "everything", "covers every latent cell, so nothing of the source would be kept"
    return None


def load_user_mask(
    path,
    image_size,
    grid,
    polarity: str = "white-edit",
    *,
    original_size=None,
    partition: str = "exact",
    cell_threshold: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a user mask, align it with the preprocessed image and cut it into latent cells.

    Args:
        path: mask file of any size and mode (grayscale, RGB, RGBA, palette, 16-bit).
        image_size: ``(H, W)`` of the preprocessed image (``schedules.pixel_size(schedule)``).
        grid: final latent grid ``(h_K, w_K)``.
        polarity: ``"white-edit"`` (default, light = edit) or ``"black-edit"`` (the reference's ``mask.png``).
        original_size: the original image's PIL ``size`` ``(width, height)``, to warn when the mask was drawn at
            another aspect ratio.
        partition: cell partition, see :mod:`editinfinity.edit.mask` (``"exact"`` unless reproducing the reference).
        cell_threshold: edit fraction from which a cell counts as edited (used for validation only).

    Returns:
        ``(pixel_edit_mask (H, W) bool tensor, cell fractions (h_K, w_K) float64 tensor)``.

    Raises:
        InvalidCaseError: unreadable file, bad polarity, or an edit region that covers nothing or everything (the
            message suggests ``--mask-polarity`` when the other polarity would give a usable mask).
    """
    _check_polarity(polarity)
    if partition not in PARTITIONS:
        raise InvalidCaseError(f"`partition` must be one of {PARTITIONS}, got {partition!r}")
    dark, opaque = _mask_planes(open_fully(path, "mask", "mask"))
    if original_size is not None:
        sw, sh = (int(v) for v in original_size)
        mh, mw = dark.shape
        if abs(math.log((mh / mw) / (sh / sw))) > 0.01:
            logger.warning(
                "mask %s is %dx%d px but the image is %dx%d px (W x H): different aspect ratios, the mask is "
                "stretched by the same centre crop and may not line up", path, mw, mh, sw, sh,
            )

    def cut(pol: str) -> tuple[np.ndarray, torch.Tensor]:
        edit = align_mask((dark if pol == "black-edit" else ~dark) & opaque, image_size)
        return edit, cell_fractions_from_pixels(edit, grid, partition=partition)

    edit, fractions = cut(polarity)
    problem = _mask_problem(edit, fractions, cell_threshold)
    if problem is not None:
        other = _other(polarity)
        inverted_ok = _mask_problem(*cut(other), cell_threshold) is None
        kind, text = problem
        hint = (f" If {'white' if polarity == 'black-edit' else 'black'} marks the region to edit in this file, "
                f"pass --mask-polarity {other}." if inverted_ok else "")
        if kind == "everything":
            hint += " For a whole-image edit use --whole-image (`mode: whole` in a case file) instead of a mask."
        elif not inverted_ok:
            hint += (f" Draw the region to edit in {'white' if polarity == 'white-edit' else 'black'} "
                     f"(--mask-polarity {polarity}) and make it larger than one {image_size[0] // grid[0]} px cell.")
        raise InvalidCaseError(f"mask {path} (field `mask`, --mask-polarity {polarity}) {text}.{hint}")
    frac = float(edit.mean())
    if frac > _MOSTLY_EDIT:
        logger.warning(
            "mask %s marks %.0f%% of the image for editing with --mask-polarity %s; if it shows the region to keep "
            "in %s, pass --mask-polarity %s", path, 100 * frac, polarity,
            "white" if polarity == "white-edit" else "black", _other(polarity),
        )
    logger.info("mask %s: %.1f%% of pixels edited, %d of %d cells at >= %.0f%%", path, 100 * frac,
                int((fractions >= cell_threshold).sum()), fractions.numel(), 100 * cell_threshold)
    return torch.from_numpy(edit), fractions
