"""Case inputs: image and mask loading, the one image preprocessing, and the case description with validation.

One preprocessing for every stage (METHOD.md §2.3, Q3): RGB, aspect-preserving *cover* resize with LANCZOS, then
a centre crop to the schedule's pixel size. The resize uses exact integer arithmetic for the other side
(``floor(W * h / w)``), which equals the reference's ``int(W / (w / h))`` except where the reference's float
division falls just below an integer (it would then crop one row short).

User masks (DESIGN.md): white = edit by default (as diffusers' inpainting), ``black-edit`` for the reference's files
(its ``mask.png`` is black = edit). Grey levels: a pixel is *dark* iff its 8-bit luminance is ``<= 128`` (the
reference's rule), *light* otherwise. Colour images use PIL's ``L`` conversion (ITU-R 601-2 luma). Transparent pixels
(alpha < 128) are background (keep) whatever their colour, so a cut-out drawn on a transparent layer works with
either polarity. The mask is aligned with the same cover-resize + centre-crop geometry as the image, so a mask drawn
on the original picture (or a scaled copy of it) covers the same content after preprocessing.

Deviation from the reference: EXIF orientation tags are applied (``ImageOps.exif_transpose``) to images and masks,
so both are used as every viewer shows them; the reference ignores the tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from editinfinity.edit.mask import PARTITIONS, cell_fractions_from_pixels
from editinfinity.errors import InvalidCaseError
from editinfinity.models import schedules

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "MASK_POLARITIES",
    "ASPECT_SLACK",
    "DARK_MAX",
    "load_image",
    "choose_schedule",
    "cover_geometry",
    "preprocess_image",
    "image_to_tensor",
    "read_mask",
    "align_mask",
    "load_user_mask",
    "CaseSpec",
]

MODES = ("auto", "mask", "whole")
MASK_POLARITIES = ("white-edit", "black-edit")
#: Aspect ratios up to 20 % beyond the extreme templates (1/3 .. 3) are accepted (and cropped to the template).
ASPECT_SLACK = 1.2
#: 8-bit luminance at or below which a mask pixel is dark (the reference's ``> 128`` = light rule).
DARK_MAX = 128
#: The fraction of the image an edit region may cover before we warn that the polarity may be inverted.
_MOSTLY_EDIT = 0.5

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


def _open_fully(path, what: str, field_name: str) -> Image.Image:
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
        img = Image.fromarray(_to_uint8(img))  # 2-D uint8 -> mode L
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is then dropped below
    return img.convert("RGB")


def _to_uint8(img: Image.Image) -> np.ndarray:
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
    img = _open_fully(path, "image", "image")
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


def _cover_resize_crop(img: Image.Image, dst_hw, resample) -> Image.Image:
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
    out = _cover_resize_crop(_to_rgb(img), (big_h, big_w), Image.LANCZOS)
    (rh, rw), _ = cover_geometry((img.height, img.width), (big_h, big_w))
    kept = (big_h * big_w) / (rh * rw)
    if kept < 0.9:
        logger.warning("%s: the centre crop to %dx%d keeps only %.0f%% of the picture",
                       _name(img, source), big_w, big_h, 100 * kept)
    return image_to_tensor(out), out


# ---------------------------------------------------------------------------------------------------------------
# user masks


def _check_polarity(polarity: str) -> None:
    if polarity not in MASK_POLARITIES:
        raise InvalidCaseError(f"`mask_polarity` must be one of {', '.join(MASK_POLARITIES)}, got {polarity!r}")


def _mask_planes(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(dark, opaque) bool planes of a mask image of any mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        lum = _to_uint8(img)
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
    dark, opaque = _mask_planes(_open_fully(path, "mask", "mask"))
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
    out = _cover_resize_crop(pic, (big_h, big_w), Image.LANCZOS)
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
    dark, opaque = _mask_planes(_open_fully(path, "mask", "mask"))
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
            hint += " For a whole-image edit use --mode whole instead of a mask."
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


# ---------------------------------------------------------------------------------------------------------------
# case description


def _words(text: str) -> list[str]:
    return [w for w in (re.sub(r"^\W+|\W+$", "", t).casefold() for t in text.split()) if w]


def _is_uri(path: str) -> bool:
    return "://" in str(path)


@dataclass
class CaseSpec:
    """Everything that defines one edit. Paths may be local files or URIs (``gs://``, ``s3://``).

    Attributes:
        image: source image file (or an already loaded PIL image, for in-process use).
        prompt: description of the source image (``t_sou``).
        edit_prompt: description of the wanted result (``t_tar``).
        mode: ``"auto"`` (mask from the target word's attention), ``"mask"`` (user mask) or ``"whole"`` (no mask).
        target_word: word or phrase of ``prompt`` naming what to edit (mode auto only).
        mask: user mask file (mode mask only); see ``mask_polarity``.
        mask_polarity: ``"white-edit"`` (default) or ``"black-edit"`` (the reference's files).
        resolution: pixel budget, one of ``schedules.BUDGETS``.
        seed: seeds every random draw of the run.
        prompt_iters: prompt-tuning optimizer updates (the reference makes 9; METHOD.md Q10).
        lora_iters: LoRA optimizer updates (the reference makes 49).
        threshold: relative attention threshold (mode auto).
        preset: model preset name or checkpoint directory.
    """

    image: str | Image.Image
    prompt: str
    edit_prompt: str
    mode: str = "auto"
    target_word: str | None = None
    mask: str | None = None
    mask_polarity: str = "white-edit"
    resolution: str = "0.06M"
    seed: int = 0
    prompt_iters: int = 10
    lora_iters: int = 50
    threshold: float = 0.5
    preset: str = "tiny"

    def __post_init__(self) -> None:
        # Paths are kept as strings so that the spec stays JSON-able (``to_dict``).
        for name in ("image", "mask"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))

    # -- validation ------------------------------------------------------------------------------------------

    def validate(self, *, check_files: bool = True) -> CaseSpec:
        """Check every field; raise :class:`InvalidCaseError` naming the field and the fix. Returns ``self``.

        An edit prompt equal to the prompt is allowed (it reconstructs the source) but logged as a warning.
        ``check_files`` also checks that local image/mask paths exist (URIs are not checked).
        """
        for name in ("prompt", "edit_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                what = "the source image" if name == "prompt" else "the wanted result"
                raise InvalidCaseError(f"`{name}` is empty: give a sentence describing {what}")
        if " ".join(self.prompt.split()) == " ".join(self.edit_prompt.split()):
            logger.warning("`edit_prompt` equals `prompt` (%r): the result will reconstruct the source image",
                           self.prompt)
        if self.mode not in MODES:
            raise InvalidCaseError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._validate_mode_fields()
        if self.mask_polarity not in MASK_POLARITIES:
            raise InvalidCaseError(
                f"`mask_polarity` must be one of {', '.join(MASK_POLARITIES)}, got {self.mask_polarity!r}"
            )
        if self.resolution not in schedules.BUDGETS:
            raise InvalidCaseError(
                f"`resolution` must be one of {', '.join(schedules.BUDGETS)}, got {self.resolution!r}"
            )
        for name in ("seed", "prompt_iters", "lora_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidCaseError(f"`{name}` must be a non-negative integer, got {value!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= float(self.threshold) < 1.0:
            raise InvalidCaseError(f"`threshold` must be a number in [0, 1), got {self.threshold!r}")
        if not isinstance(self.preset, str) or not self.preset.strip():
            raise InvalidCaseError(f"`preset` must name a preset or a checkpoint directory, got {self.preset!r}")
        if isinstance(self.image, Image.Image):
            if self.image.width < 1 or self.image.height < 1:
                raise InvalidCaseError("`image` is an empty picture (0 px)")
        elif not isinstance(self.image, (str, Path)) or not str(self.image).strip():
            raise InvalidCaseError("`image` is empty: give the source image file")
        elif check_files:
            self._check_file("image", self.image)
        if check_files:
            if self.mask is not None:
                self._check_file("mask", self.mask)
        return self

    def _validate_mode_fields(self) -> None:
        has_word = self.target_word is not None and str(self.target_word).strip() != ""
        has_mask = self.mask is not None and str(self.mask).strip() != ""
        if self.mode == "auto":
            if not has_word:
                raise InvalidCaseError(
                    "mode 'auto' needs `target_word` (the word of `prompt` naming what to edit); "
                    "or use mode 'mask' with a `mask` file, or mode 'whole'"
                )
            if has_mask:
                raise InvalidCaseError("mode 'auto' builds its own mask: remove `mask`, or set `mode` to 'mask'")
            if not isinstance(self.target_word, str):
                raise InvalidCaseError(f"`target_word` must be a string, got {self.target_word!r}")
            words, target = _words(self.prompt), _words(self.target_word)
            if not any(words[i:i + len(target)] == target for i in range(len(words) - len(target) + 1)):
                raise InvalidCaseError(
                    f"`target_word` {self.target_word!r} does not occur in `prompt`; choose one of its words: "
                    f"{', '.join(dict.fromkeys(words))}"
                )
        elif self.mode == "mask":
            if not has_mask:
                raise InvalidCaseError("mode 'mask' needs a `mask` file (white = edit unless "
                                       "`mask_polarity: black-edit`); or use mode 'auto' with a `target_word`")
            if has_word:
                raise InvalidCaseError("mode 'mask' takes its region from `mask`: remove `target_word`, "
                                       "or set `mode` to 'auto' and remove `mask`")
        else:
            if has_mask or has_word:
                given = " and ".join(n for n, v in (("`mask`", has_mask), ("`target_word`", has_word)) if v)
                raise InvalidCaseError(
                    f"mode 'whole' edits the whole image and takes neither `mask` nor `target_word`: remove {given}, "
                    f"or choose mode {'mask' if has_mask else 'auto'}"
                )

    @staticmethod
    def _check_file(name: str, path) -> None:
        if _is_uri(path):
            return
        p = Path(path)
        if not p.is_file():
            raise InvalidCaseError(f"`{name}` file not found: {p}; check the path")

    # -- conversion -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the public fields (for ``case.json``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_dict(cls, data: dict, *, base_dir=None, source: str = "case", validate: bool = True,
                  check_files: bool = False) -> CaseSpec:
        """Build from a mapping; relative ``image``/``mask`` paths are resolved against ``base_dir``.

        When ``mode`` is absent it is inferred: ``mask`` given -> "mask", ``target_word`` given -> "auto",
        neither -> "whole". Files are not checked by default (a spec read back from a case artifact may name
        files of another machine); :meth:`from_file` checks them.
        """
        if not isinstance(data, dict):
            raise InvalidCaseError(f"{source} must be a mapping of field: value, got {type(data).__name__}")
        allowed = cls.field_names()
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise InvalidCaseError(f"{source}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        for name in ("image", "prompt", "edit_prompt"):
            if data.get(name) is None:
                raise InvalidCaseError(f"{source}: missing required field `{name}`")
        kwargs = dict(data)
        if "mode" not in kwargs:
            kwargs["mode"] = "mask" if kwargs.get("mask") else "auto" if kwargs.get("target_word") else "whole"
            logger.info("%s: no `mode` given, using %r", source, kwargs["mode"])
        for name in ("image", "mask"):
            value = kwargs.get(name)
            if value is not None and base_dir is not None and not _is_uri(value) and not Path(value).is_absolute():
                kwargs[name] = str(Path(base_dir) / value)
            elif isinstance(value, Path):
                kwargs[name] = str(value)
        spec = cls(**kwargs)
        return spec.validate(check_files=check_files) if validate else spec

    @classmethod
    def from_file(cls, path, *, validate: bool = True) -> CaseSpec:
        """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) case file; keys are the field names."""
        p = Path(path)
        if not p.is_file():
            raise InvalidCaseError(f"case file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidCaseError(f"case file {p} cannot be read as UTF-8 text ({e})") from e
        try:
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise InvalidCaseError(f"case file {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                                   f"{e}") from e
        return cls.from_dict(data, base_dir=p.parent, source=f"case file {p}", validate=validate, check_files=True)

    @classmethod
    def from_reference_dir(cls, case_dir, *, mode: str | None = None, validate: bool = True, **overrides) -> CaseSpec:
        """Read the reference repository's case layout.

        ``image/original_image.jpg``, ``prompt/original_image_prompt.txt``, ``prompt/edit_image_prompt.txt``;
        ``prompt/target_word.txt`` (comma-separated, the first word is used) selects mode "auto"; otherwise
        ``image/mask.png`` (black = edit) selects mode "mask"; otherwise mode "whole". When both exist the mask is
        taken to be the reference's rendered attention mask and ignored (pass ``mode="mask"`` to use it).
        ``overrides`` set any other field (resolution, seed, ...).
        """
        root = Path(case_dir)
        if not root.is_dir():
            raise InvalidCaseError(f"reference case directory not found: {root}")
        image = root / "image" / "original_image.jpg"
        if not image.is_file():
            raise InvalidCaseError(f"reference case {root}: missing image file {image}")
        prompt = _read_text(root / "prompt" / "original_image_prompt.txt", root)
        edit_prompt = _read_text(root / "prompt" / "edit_image_prompt.txt", root)
        word_file, mask_file = root / "prompt" / "target_word.txt", root / "image" / "mask.png"
        if mode is None:
            mode = "auto" if word_file.is_file() else "mask" if mask_file.is_file() else "whole"
            if mode == "auto" and mask_file.is_file():
                logger.info("reference case %s: ignoring %s (target_word.txt selects the attention mask)", root,
                            mask_file)
        target_word = mask = None
        if mode == "auto":
            words = [w.strip() for w in _read_text(word_file, root).split(",") if w.strip()]
            if not words:
                raise InvalidCaseError(f"reference case {root}: {word_file} holds no word")
            if len(words) > 1:
                logger.info("reference case %s: using the first target word %r of %s", root, words[0], words)
            target_word = words[0]
        elif mode == "mask":
            if not mask_file.is_file():
                raise InvalidCaseError(f"reference case {root}: missing mask file {mask_file}")
            mask = str(mask_file)
        kwargs = dict(image=str(image), prompt=prompt, edit_prompt=edit_prompt, mode=mode, target_word=target_word,
                      mask=mask, mask_polarity="black-edit")
        kwargs.update(overrides)
        spec = cls(**kwargs)
        return spec.validate() if validate else spec


def _read_text(path: Path, root: Path) -> str:
    if not path.is_file():
        raise InvalidCaseError(f"reference case {root}: missing file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidCaseError(f"reference case {root}: cannot read {path} as UTF-8 text ({e})") from e
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
