"""PIE-Bench: read ``mapping_file.json``, decode its run-length masks, turn each entry into an edit case.

PIE-Bench (PnP-Inversion, Ju et al. 2023) is a folder with ``mapping_file.json`` and ``annotation_images/``. The
mapping file is a JSON object keyed by a 12-digit id; each entry has

* ``image_path``: the source picture, relative to ``annotation_images/`` (512x512 JPEG);
* ``original_prompt`` / ``editing_prompt``: the prompts, the words that differ written in ``[ ]``;
* ``editing_instruction``: the same edit as an instruction (unused by EditInfinity);
* ``editing_type_id``: ``"0"``-``"9"`` (:data:`EDIT_TYPES`);
* ``blended_word``: ``"<source word> <target word>"`` (Prompt-to-Prompt's blend words) or ``""``;
* ``mask``: run-length pairs ``[start, length, start, length, ...]`` over the row-major 512x512 picture, 1 = edit.

:func:`decode_mask` follows PnP-Inversion's ``mask_decode`` (evaluation/evaluate.py) exactly, vectorised: runs past
the end are clipped, and with ``border=True`` (the evaluation's convention) the one-pixel frame is set to 1 "to avoid
annotation errors". The annotation *as drawn* (``border=False``) is what the user-mask mode edits with; the scores
use the framed mask, as PnP-Inversion's do.

A malformed entry raises :class:`PieBenchEntryError` naming the entry and the field; :func:`read_piebench`
collects those errors and keeps every good entry, so a bad entry never stops the others.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..edit.modes import MODES
from ..errors import InvalidCaseError
from ..storage.uri import has_scheme, join_uri

log = logging.getLogger(__name__)

MAPPING_FILE = "mapping_file.json"
IMAGES_DIR = "annotation_images"
#: Height and width of every PIE-Bench picture and mask.
MASK_SHAPE: tuple[int, int] = (512, 512)

#: Edit types by ``editing_type_id`` (folder names ``<id>_<name>_<count>`` under ``annotation_images/``).
EDIT_TYPES: dict[int, str] = {
    0: "random",
    1: "change object",
    2: "add object",
    3: "delete object",
    4: "change content",
    5: "change pose",
    6: "change color",
    7: "change material",
    8: "change background",
    9: "change style",
}

_REQUIRED = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_EDGE_PUNCT = re.compile(r"^\W+|\W+$")


class PieBenchEntryError(InvalidCaseError):
    """One entry of a mapping file is malformed; the message names the entry id and the field."""

    def __init__(self, entry_id: str, message: str) -> None:
        super().__init__(f"PIE-Bench entry {entry_id!r}: {message}")
        self.entry_id = entry_id
        self.reason = message


# ---------------------------------------------------------------------------------------------------------------
# Masks


def _rle_pairs(rle: Any, *, where: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) as int64 arrays from a flat run-length list; ValueError says what is wrong."""
    if not isinstance(rle, (list, tuple)):
        raise ValueError(f"`{where}` must be a list of [start, length] pairs, got {type(rle).__name__}")
    if len(rle) % 2:
        raise ValueError(f"`{where}` has an odd number of values ({len(rle)}); it holds [start, length] pairs")
    bad = next((v for v in rle if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
        raise ValueError(f"`{where}` must hold integers, found {bad!r}")
    arr = np.asarray(rle, dtype=np.int64).reshape(-1, 2)
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"`{where}` has a negative start or length ({int(arr.min())})")
    return arr[:, 0], arr[:, 1]


def decode_mask(rle: Sequence[int], shape: tuple[int, int] = MASK_SHAPE, *, border: bool = True) -> np.ndarray:
    """Bool ``shape`` mask (True = edit) from PIE-Bench run-length pairs.

    Same result as PnP-Inversion's ``mask_decode``: pixels ``start .. start + length - 1`` of the row-major
    flattened picture are set (runs are clipped at the end of the picture, overlaps are fine); with ``border`` the
    first and last rows and columns are set as well, as its evaluation does.
    """
    starts, lengths = _rle_pairs(list(rle))
    total = shape[0] * shape[1]
    ends = np.minimum(starts + lengths, total)
    keep = starts < ends
    delta = np.zeros(total + 1, dtype=np.int64)
    np.add.at(delta, starts[keep], 1)
    np.add.at(delta, ends[keep], -1)
    mask = (np.cumsum(delta[:-1]) > 0).reshape(shape)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """Run-length pairs ``[start, length, ...]`` of the True pixels of a 2-D mask (row-major), the inverse of
    :func:`decode_mask` with ``border=False``."""
    flat = np.asarray(mask, dtype=bool).ravel()
    padded = np.concatenate([[False], flat, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts, strict=True) for v in pair]


# ---------------------------------------------------------------------------------------------------------------
# Prompts and target words


def strip_brackets(prompt: str) -> str:
    """The prompt without ``[`` and ``]`` (what PnP-Inversion feeds to CLIP and the editors)."""
    return prompt.replace("[", "").replace("]", "")


def _words(text: str) -> list[str]:
    return [w for w in (_EDGE_PUNCT.sub("", t) for t in text.split()) if w]


def contains_words(prompt: str, target: str) -> bool:
    """True when ``target`` (one or more words) occurs in ``prompt`` as whole words, case-insensitively and
    ignoring punctuation between them (the matching rule of ``models.text.target_token_range``)."""
    words = _words(target)
    if not words:
        return False
    body = r"\W+".join(re.escape(w) for w in words)
    return re.search(rf"(?<!\w){body}(?!\w)", prompt, re.IGNORECASE) is not None


def choose_target_word(original_prompt: str, blended_word: str) -> tuple[str | None, str]:
    """The word(s) of the source prompt that name what to edit, and where they came from.

    First the source half of ``blended_word`` (``"cat dog"`` -> ``cat``), when the prompt contains it; else the
    first bracketed group of ``original_prompt`` that is not empty. Returns ``(None, "")`` when neither exists
    (e.g. an added object: the source prompt has nothing to point at).
    """
    clean = strip_brackets(original_prompt)
    parts = blended_word.split()
    if parts and contains_words(clean, parts[0]):
        return parts[0], "blended_word"
    for group in _BRACKETS.findall(original_prompt):
        text = " ".join(_words(group))
        if text and contains_words(clean, text):
            return text, "brackets"
    return None, ""


# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class PieBenchCase:
    """One PIE-Bench entry, validated.

    ``image`` is the source picture (a local path, or a URI when the data set lives in an object store);
    ``prompt``/``edit_prompt`` have the brackets removed; ``target_word`` is :func:`choose_target_word`'s pick.
    """

    id: str
    image_path: str
    image: str
    prompt: str
    edit_prompt: str
    original_prompt: str
    editing_prompt: str
    instruction: str
    edit_type: int
    blended_word: str
    target_word: str | None
    target_word_source: str
    rle: tuple[int, ...] = field(repr=False)

    @property
    def edit_type_name(self) -> str:
        return EDIT_TYPES[self.edit_type]

    def annotation_mask(self, *, border: bool = True) -> np.ndarray:
        """The annotation as a bool 512x512 mask (True = edit); ``border`` as :func:`decode_mask`."""
        return decode_mask(self.rle, border=border)

    def edit_mode(self, mode: str) -> tuple[str, str]:
        """``(mode used, note)`` for a requested mode: ``auto`` without a target word falls back to ``whole``."""
        if mode not in MODES:
            raise InvalidCaseError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto" and self.target_word is None:
            return "whole", "no target word in the source prompt (blended_word empty, no [ ] group): whole image"
        return mode, ""

    def to_dict(self, *, with_mask: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["edit_type_name"] = self.edit_type_name
        rle = d.pop("rle")
        if with_mask:
            d["rle"] = list(rle)
        return d


def _text_field(entry: dict, name: str, entry_id: str, *, required: bool = True) -> str:
    value = entry.get(name, None if required else "")
    if value is None and required:
        raise PieBenchEntryError(entry_id, f"field `{name}` is missing")
    if not isinstance(value, str):
        raise PieBenchEntryError(entry_id, f"field `{name}` must be a string, got {type(value).__name__}")
    return value


def _check_brackets(text: str, name: str, entry_id: str) -> None:
    depth = 0
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            break
    if depth != 0:
        raise PieBenchEntryError(entry_id, f"field `{name}` has unbalanced or nested [ ] brackets: {text!r}")


def parse_entry(entry_id: str, entry: Any, images_root: str, *, check_image: bool = True) -> PieBenchCase:
    """Validate one mapping-file entry and build its :class:`PieBenchCase`.

    ``images_root`` is the ``annotation_images`` folder (path or URI); ``check_image`` also checks that a local
    image file exists. Raises :class:`PieBenchEntryError` naming the entry and the field.
    """
    if not isinstance(entry_id, str) or not _ID.match(entry_id):
        raise PieBenchEntryError(str(entry_id), "the id must be letters, digits, '.', '_' or '-'")
    if not isinstance(entry, dict):
        raise PieBenchEntryError(entry_id, f"must be a JSON object, got {type(entry).__name__}")
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise PieBenchEntryError(entry_id, f"missing field(s) {', '.join(f'`{k}`' for k in missing)}")
    image_path = _text_field(entry, "image_path", entry_id)
    rel = Path(image_path)
    if not image_path.strip() or rel.is_absolute() or ".." in rel.parts or "\\" in image_path:
        raise PieBenchEntryError(entry_id, f"`image_path` must be a path inside {IMAGES_DIR}/, got {image_path!r}")
    original = _text_field(entry, "original_prompt", entry_id)
    editing = _text_field(entry, "editing_prompt", entry_id)
    for name, text in (("original_prompt", original), ("editing_prompt", editing)):
        _check_brackets(text, name, entry_id)
        if not strip_brackets(text).strip():
            raise PieBenchEntryError(entry_id, f"field `{name}` is empty")
    type_raw = entry["editing_type_id"]
    type_text = str(type_raw).strip() if isinstance(type_raw, (str, int)) and not isinstance(type_raw, bool) else ""
    if not type_text.isdigit() or int(type_text) not in EDIT_TYPES:
        raise PieBenchEntryError(entry_id, f"`editing_type_id` must be \"0\"..\"9\", got {type_raw!r}")
    blended = _text_field(entry, "blended_word", entry_id, required=False)
    instruction = _text_field(entry, "editing_instruction", entry_id, required=False)
    try:
        starts, lengths = _rle_pairs(entry["mask"])
    except ValueError as exc:
        raise PieBenchEntryError(entry_id, str(exc)) from None
    total = MASK_SHAPE[0] * MASK_SHAPE[1]
    if starts.size and int(starts.max()) >= total:
        raise PieBenchEntryError(entry_id, f"`mask` has a run starting at {int(starts.max())}, outside the "
                                           f"{MASK_SHAPE[0]}x{MASK_SHAPE[1]} picture")
    image = join_uri(images_root, image_path)
    if check_image and not has_scheme(image) and not Path(image).is_file():
        raise PieBenchEntryError(entry_id, f"image {image} (field `image_path`) does not exist")
    target, source = choose_target_word(original, blended)
    return PieBenchCase(
        id=entry_id, image_path=image_path, image=image, prompt=strip_brackets(original).strip(),
        edit_prompt=strip_brackets(editing).strip(), original_prompt=original, editing_prompt=editing,
        instruction=instruction, edit_type=int(type_text), blended_word=blended, target_word=target,
        target_word_source=source, rle=tuple(int(v) for v in entry["mask"]),
    )


@dataclass
class PieBenchSet:
    """The cases of a mapping file that passed validation, and one error per malformed entry."""

    root: str
    cases: list[PieBenchCase]
    errors: list[PieBenchEntryError]
    total_entries: int

    def by_id(self) -> dict[str, PieBenchCase]:
        return {c.id: c for c in self.cases}


def parse_types(types: str | Iterable[int] | None) -> tuple[int, ...] | None:
    """``"0,1,9"`` or ``[0, 1, 9]`` -> ``(0, 1, 9)``; None/"" -> None (every type). Bad values raise
    InvalidCaseError."""
    if types is None or types == "":
        return None
    items = [t.strip() for t in types.split(",")] if isinstance(types, str) else list(types)
    out = []
    for t in items:
        if isinstance(t, str) and not t.isdigit() or isinstance(t, bool) or int(t) not in EDIT_TYPES:
            raise InvalidCaseError(f"--types takes edit type ids 0-9 separated by commas, got {types!r}")
        out.append(int(t))
    return tuple(sorted(set(out)))


def parse_mapping(mapping: Any, root: str, *, types: str | Iterable[int] | None = None, limit: int | None = None,
                  check_images: bool = True, where: str = MAPPING_FILE) -> PieBenchSet:
    """Validate every entry of a loaded mapping (dict); see :func:`read_piebench`."""
    if not isinstance(mapping, dict):
        raise InvalidCaseError(f"{where} must hold a JSON object keyed by image id, got {type(mapping).__name__}")
    if limit is not None and limit < 1:
        raise InvalidCaseError(f"--limit must be >= 1, got {limit}")
    wanted = parse_types(types)
    images_root = join_uri(root, IMAGES_DIR)
    cases: list[PieBenchCase] = []
    errors: list[PieBenchEntryError] = []
    for key, entry in mapping.items():
        if limit is not None and len(cases) + len(errors) >= limit:
            break
        if wanted is not None:
            raw = entry.get("editing_type_id") if isinstance(entry, dict) else None
            if str(raw).strip().isdigit() and int(str(raw).strip()) not in wanted:
                continue
        try:
            cases.append(parse_entry(key, entry, images_root, check_image=check_images))
        except PieBenchEntryError as exc:
            log.warning("%s", exc)
            errors.append(exc)
    return PieBenchSet(root=root, cases=cases, errors=errors, total_entries=len(mapping))


def read_piebench(data_dir: str, *, types: str | Iterable[int] | None = None, limit: int | None = None,
                  check_images: bool = True) -> PieBenchSet:
    """Read ``<data_dir>/mapping_file.json`` (a local folder or a gs:// / s3:// prefix).

    Entries are kept in file order; ``types`` keeps only those edit types (entries whose type cannot be read are
    kept, so that they are reported); ``limit`` stops after that many selected entries (good or bad). Malformed
    entries end up in ``errors``; an unreadable or non-JSON mapping file raises InvalidCaseError.
    """
    root = str(data_dir)
    where = join_uri(root, MAPPING_FILE)
    if has_scheme(root):
        from .. import storage

        raw = storage.read_bytes(where)
    else:
        path = Path(where)
        if not Path(root).is_dir():
            raise InvalidCaseError(f"--data {root} is not a folder; give the PIE-Bench folder that holds "
                                   f"{MAPPING_FILE} and {IMAGES_DIR}/")
        if not path.is_file():
            raise InvalidCaseError(f"{path} does not exist; --data must be the PIE-Bench folder holding "
                                   f"{MAPPING_FILE} and {IMAGES_DIR}/")
        raw = path.read_bytes()
    try:
        mapping = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCaseError(f"{where} is not valid JSON ({exc})") from None
    return parse_mapping(mapping, root, types=types, limit=limit, check_images=check_images, where=where)

