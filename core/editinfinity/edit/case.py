"""The case description (``CaseSpec``): what one edit is, with validation, and reading it from case files.

Every field of a case file is used; any other key is refused (``from_dict``), so a case file never has a setting
silently dropped. Besides the case's own fields a case file may give the run settings of ``RUN_SETTINGS`` (seed,
update counts, threshold, preset): :func:`split_run_settings` is the one reader of them, for the CLI (``--case``),
the library (``CaseSpec.from_file``; ``spec.run_settings``, ``spec.edit_settings()``) and the batch cases file
(``batch.cases``, also read by the KFP batch components). The image and mask files are read by ``images`` and
``user_mask``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from editinfinity.edit.modes import MASK_POLARITIES, MODES, infer_mode
from editinfinity.errors import InvalidCaseError
from editinfinity.models import schedules
from editinfinity.models.text import split_occurrence
from editinfinity.storage.uri import has_scheme

logger = logging.getLogger(__name__)




# ---------------------------------------------------------------------------------------------------------------
# run settings a case file may give

#: Case-file fields that are settings of the run rather than of the case, and the flag that gives each on the
#: command line (where a flag given with ``--case`` replaces the file's value).
RUN_SETTINGS = {"seed": "--seed", "prompt_iters": "--prompt-iters", "lora_iters": "--lora-iters",
                "threshold": "--threshold", "preset": "--preset"}


def _run_setting(key: str, value, source: str):
    """``value`` of the run setting ``key``, checked as its flag checks it (``cli_options``)."""
    from ..cli_options import ITERS, SEED, fraction

    if key == "preset":
        ok = isinstance(value, str) and bool(value.strip())
    else:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (key == "threshold" or isinstance(value, int))
        if ok:
            check = {"seed": SEED, "prompt_iters": ITERS, "lora_iters": ITERS, "threshold": fraction}[key]
            try:
                check(str(value))
            except argparse.ArgumentTypeError:
                ok = False
    if not ok:
        raise InvalidCaseError(f"{source}: `{key}` {value!r} is not valid; see {RUN_SETTINGS[key]} in "
                               "`editinfinity edit --help`")
    return value


def split_run_settings(data: dict, source: str = "case") -> tuple[dict, dict]:
    """``(case fields, run settings)`` of a case-file mapping; each run setting (``RUN_SETTINGS``) is checked as
    its command-line flag would be, and refused naming the field and the flag."""
    run = {k: _run_setting(k, v, source) for k, v in data.items() if k in RUN_SETTINGS}
    return {k: v for k, v in data.items() if k not in RUN_SETTINGS}, run


# ---------------------------------------------------------------------------------------------------------------
# case description


def _words(text: str) -> list[str]:
    return [w for w in (re.sub(r"^\W+|\W+$", "", t).casefold() for t in text.split()) if w]


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
        resolution: pixel budget, one of ``schedules.BUDGETS``; None (not given): the preset's
            (``models.presets.default_resolution``), chosen when the case is prepared.

    The method's settings (seed, updates, threshold, ...) are not part of a case: they are ``EditSettings``, given
    on the command line or in Python. A case file may still give those of ``RUN_SETTINGS``: they are kept in
    ``run_settings`` (not a case field: not in ``to_dict``) and applied by :meth:`edit_settings` (the preset is for
    whoever loads the models: ``run_settings.get("preset")``).
    """

    image: str | Image.Image
    prompt: str
    edit_prompt: str
    mode: str = "auto"
    target_word: str | None = None
    mask: str | None = None
    mask_polarity: str = "white-edit"
    resolution: str | None = None
    run_settings: dict = field(default_factory=dict, compare=False, metadata={"case_field": False})

    def __post_init__(self) -> None:
        # Paths are kept as strings so that the spec stays JSON-able (``to_dict``).
        for name in ("image", "mask"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))

    # -- validation ------------------------------------------------------------------------------------------

    def validate(self, *, check_files: bool = True) -> CaseSpec:
        """Check every field; raise :class:`InvalidCaseError` naming the field and the fix. Returns ``self``.

        An edit prompt equal to the prompt is allowed (it reconstructs the source); :meth:`warn_if_reconstruction`
        says so once per edit. ``check_files`` also checks that local image/mask paths exist (URIs are not checked).
        """
        for name in ("prompt", "edit_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidCaseError(f"`{name}` must be text, got {type(value).__name__} {value!r}; put it in "
                                       "quotes in the case file")
            if not isinstance(value, str) or not value.strip():
                what = "the source image" if name == "prompt" else "the wanted result"
                raise InvalidCaseError(f"`{name}` is empty: give a sentence describing {what}")
        if self.mode not in MODES:
            raise InvalidCaseError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        self._validate_mode_fields()
        if self.mask_polarity not in MASK_POLARITIES:
            raise InvalidCaseError(
                f"`mask_polarity` must be one of {', '.join(MASK_POLARITIES)}, got {self.mask_polarity!r}"
            )
        if self.resolution is not None and self.resolution not in schedules.BUDGETS:
            raise InvalidCaseError(
                f"`resolution` must be one of {', '.join(schedules.BUDGETS)}, got {self.resolution!r}"
            )
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

    def warn_if_reconstruction(self) -> None:
        """Log a warning when the edit prompt equals the prompt: the edit then reconstructs the source. Called once
        per edit, where its case is made (``prepare.case_from_source``), not by every check of the spec."""
        if " ".join(self.prompt.split()) == " ".join(self.edit_prompt.split()):
            logger.warning("`edit_prompt` equals `prompt` (%r): the result will reconstruct the source image",
                           self.prompt)

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
            word, _ = split_occurrence(self.target_word)
            words, target = _words(self.prompt), _words(word)
            if not target:
                raise InvalidCaseError(f"`target_word` {self.target_word!r} has no letter or digit; name a word of "
                                       f"`prompt`: {', '.join(dict.fromkeys(words))}")
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
        if has_scheme(path):
            return
        p = Path(path)
        if p.is_dir():
            raise InvalidCaseError(f"`{name}` {p} is a directory; give the {name} file itself")
        if not p.is_file():
            raise InvalidCaseError(f"`{name}` file not found: {p}; check the path")

    # -- conversion -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the case's fields (for ``case.json``; ``run_settings`` are not among them)."""
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("case_field", True)]

    def edit_settings(self, profile: str = "default", **overrides):
        """The method's settings for this case: ``profile``'s, with the case file's run settings, then
        ``overrides`` (None values ignored; an override replaces the file's value, as a flag given with ``--case``
        does)."""
        from .settings import EditSettings

        given = {k: v for k, v in self.run_settings.items() if k != "preset"}
        return EditSettings.from_profile(profile, **{**given, **{k: v for k, v in overrides.items() if v is not None}})

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
        data, run_settings = split_run_settings(data, source)
        allowed = cls.field_names()
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise InvalidCaseError(f"{source}: unknown field(s) {', '.join(unknown)}; allowed: "
                                   f"{', '.join([*allowed, *RUN_SETTINGS])}")
        for name in ("image", "prompt", "edit_prompt"):
            if data.get(name) is None:
                raise InvalidCaseError(f"{source}: missing required field `{name}`")
        kwargs = dict(data)
        if "mode" not in kwargs:
            kwargs["mode"] = infer_mode(mask=kwargs.get("mask"), target_word=kwargs.get("target_word"))
            logger.info("%s: no `mode` given, using %r", source, kwargs["mode"])
        for name in ("image", "mask"):
            value = kwargs.get(name)
            if value is not None and base_dir is not None and not has_scheme(value) and not Path(value).is_absolute():
                kwargs[name] = str(Path(base_dir) / value)
            elif isinstance(value, Path):
                kwargs[name] = str(value)
        spec = cls(**kwargs, run_settings=run_settings)
        return spec.validate(check_files=check_files) if validate else spec

    @classmethod
    def from_file(cls, path, *, validate: bool = True) -> CaseSpec:
        """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) case file; keys are the field names and the run
        settings of ``RUN_SETTINGS`` (kept in ``run_settings``)."""
        p = Path(path)
        return cls.from_dict(read_case_file(p), base_dir=p.parent, source=f"case file {p}", validate=validate,
                             check_files=True)

    @classmethod
    def from_reference_dir(cls, case_dir, *, mode: str | None = None, validate: bool = True, **overrides) -> CaseSpec:
        """Read the reference repository's case layout.

        ``image/original_image.jpg``, ``prompt/original_image_prompt.txt``, ``prompt/edit_image_prompt.txt``;
        ``prompt/target_word.txt`` (comma-separated, the first word is used) selects mode "auto"; otherwise
        ``image/mask.png`` (black = edit) selects mode "mask"; otherwise mode "whole". When both exist the mask is
        taken to be the reference's rendered attention mask and ignored (pass ``mode="mask"`` to use it).
        ``overrides`` set any other field (resolution, mask_polarity, ...).
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


def read_case_file(path) -> dict:
    """The mapping of a YAML or JSON case file (a byte-order mark is fine in both); not yet checked."""
    p = Path(path)
    if p.is_dir():
        raise InvalidCaseError(f"case file {p} is a directory; give the YAML/JSON file (a reference-layout case "
                               "directory has image/ and prompt/ inside)")
    if not p.is_file():
        raise InvalidCaseError(f"case file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidCaseError(f"case file {p} cannot be read as UTF-8 text ({e})") from e
    kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise InvalidCaseError(f"case file {p} is not valid {kind}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InvalidCaseError(f"case file {p} must be a mapping of field: value, got {type(data).__name__}")
    return data


def _read_text(path: Path, root: Path) -> str:
    if not path.is_file():
        raise InvalidCaseError(f"reference case {root}: missing file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidCaseError(f"reference case {root}: cannot read {path} as UTF-8 text ({e})") from e
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
