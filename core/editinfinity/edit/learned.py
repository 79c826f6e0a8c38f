"""Learned state: what prompt tuning and LoRA learn about one image, saved once and reused by any number of edits.

Prompt tuning (stage B) and LoRA (stage C) read only the image's codes and the source prompt's features, never the
edit prompt (docs/method.md), so an image learned once serves every later edit of it: ``editinfinity learn`` writes a
learned folder, ``editinfinity edit --learned DIR`` runs only what an edit needs (the edit prompt's features,
attention, mask, generation) and gives the same pixels as the one-shot edit with the same inputs and seed.

A learned folder holds::

    learned.json                    identity (image digest, prompt, resolution, preset/weights, learning settings),
                                    its key, losses, versions
    stage.json                      the stage record (format, version, seconds), as every stage directory
    image.png, codes.safetensors    the preprocessed image and its exact codes (as a case directory's)
    text.safetensors                the source prompt's T5 features (styled and plain)
    prompt_embedding.safetensors    the learned rows (stage B)
    lora/                           the LoRA adapter in peft's format (stage C)

The identity's key (:func:`learned_key`) names the folder in a learned-state cache: the same image pixels, prompt,
pixel budget, weights and learning settings always give the same key, so a cache hit reuses the state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import InvalidCaseError, OutputError, StageError
from ..models import schedules
from ..models.bundle import ModelBundle
from ..models.text import TextFeatures
from .artifacts import read_stage, stage_output, write_json
from .case import CaseSpec
from .images import image_digest
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, save_adapter, train_lora_adapter
from .prepare import CaseData, SourceData, case_from_source, encode_source
from .prompt_tuning import EMBEDDING_FILE, save_embedding, tune_prompt_embedding
from .sequence import StageTimer, Steps, run_stages
from .settings import EditSettings

log = logging.getLogger(__name__)

FORMAT = "editinfinity-learned/1"
LEARNED_FILE = "learned.json"
LORA_DIR = "lora"
SOURCE_TEXT = ("source_styled", "source_plain")

#: Settings that change only what happens after learning (mask, sampling) or how fast and in how much memory the
#: training runs, not what it computes; every other setting is part of the learned state's identity.
EDIT_ONLY_SETTINGS = frozenset({"threshold", "band", "core", "fill_holes", "min_region", "keep_pixels", "cfg", "tau",
                                "top_k", "top_p", "checkpointing", "low_memory", "compile", "attention_backend",
                                "profile"})


def learning_settings(settings: EditSettings) -> dict:
    """The settings that determine the learned state (``EDIT_ONLY_SETTINGS`` left out)."""
    return {k: v for k, v in settings.to_dict().items() if k not in EDIT_ONLY_SETTINGS}


_WEIGHT_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
_FINGERPRINT_BYTES = 1 << 16
_fingerprints: dict[str, str] = {}


def weights_identity(models: ModelBundle) -> str:
    """A machine-independent name of the weights: the random bundle's description, or for a weights directory a
    fingerprint of its files (relative path, size, first 64 KiB: safetensors headers hold every tensor's name,
    shape and offset), so the same weights copied elsewhere keep their identity."""
    source = models.source
    if not Path(source).is_dir():
        return source
    if source not in _fingerprints:
        h = hashlib.sha256()
        root = Path(source)
        for part in _WEIGHT_PARTS:
            for f in sorted(p for p in (root / part).rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(root).as_posix()}|{f.stat().st_size}|".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(_FINGERPRINT_BYTES))
        _fingerprints[source] = "files:" + h.hexdigest()[:32]
    return _fingerprints[source]


def identity(models: ModelBundle, digest: str, prompt: str, resolution: str, settings: EditSettings) -> dict:
    """What the learned state depends on: the image, the source prompt, the pixel budget, the weights (preset,
    :func:`weights_identity`, the frozen weights' dtype) and the learning settings."""
    return {"image_digest": digest, "prompt": prompt, "resolution": resolution, "preset": models.preset,
            "weights": weights_identity(models), "frozen_dtype": str(models.frozen_dtype).removeprefix("torch."),
            "settings": learning_settings(settings)}


def learned_key(ident: dict) -> str:
    """The content key of an identity (names the folder in a learned-state cache)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class LearnedState:
    """One learned image in memory: its source half, the learned rows and the LoRA adapter, and their identity."""

    source: SourceData
    prompt: str
    resolution: str
    rows: torch.Tensor
    adapter: dict[str, torch.Tensor]
    identity: dict
    settings: EditSettings
    image: str | None = None  # the image as given (path or URI), for reports
    losses: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return learned_key(self.identity)


def training_case(source: SourceData, prompt: str, resolution: str, preset: str) -> CaseData:
    """``source`` as the case the training stages read (they use the codes and the source prompt only)."""
    spec = CaseSpec(image=source.image, prompt=prompt, edit_prompt=prompt, mode="whole", resolution=resolution)
    return CaseData(spec=spec, schedule=source.schedule, image=source.image, raw_features=source.raw_features,
                    bits=source.bits, text=dict(source.text), target_range=None, user_cells=None, user_pixels=None,
                    run_id="learn", preset=preset)


def training_steps(models: ModelBundle, settings: EditSettings, progress: bool, losses: dict) -> dict:
    """Steps 2 and 3 in memory (``edit.sequence.Steps`` fields): prompt tuning returns the rows, LoRA the adapter;
    their loss curves go into ``losses`` (``prompt_tuning``, ``lora``)."""

    def tune(case: CaseData) -> torch.Tensor:
        rows, losses["prompt_tuning"] = tune_prompt_embedding(models, case, settings, progress)
        return rows

    def train(case: CaseData, rows: torch.Tensor) -> dict:
        adapter, losses["lora"] = train_lora_adapter(models, case, rows, settings, progress)
        return adapter

    return {"tune_prompt": tune, "train_lora": train}


def learn(models: ModelBundle, image, prompt: str, *, resolution: str | None = None,
          settings: EditSettings | None = None, progress: bool = True) -> LearnedState:
    """Encode the image and the source prompt, tune the prompt rows, train the LoRA adapter (stages A-C)."""
    from .prepare import _default_resolution

    settings = settings or EditSettings()
    resolution = resolution or _default_resolution(models)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidCaseError("`prompt` is empty: give a sentence describing the source image")
    if resolution not in schedules.BUDGETS:
        raise InvalidCaseError(f"`resolution` must be one of {', '.join(schedules.BUDGETS)}, got {resolution!r}")
    losses: dict = {}
    sources: list[SourceData] = []

    def prepare_source() -> CaseData:
        sources.append(encode_source(models, image, prompt, resolution, settings))
        return training_case(sources[0], prompt, resolution, models.preset)

    # Steps 1-3 of the edit's sequence; the edit prompt is not known yet, so the mode does not matter.
    timer = StageTimer(models, release_memory=settings.low_memory)
    done = run_stages(Steps(prepare=prepare_source, **training_steps(models, settings, progress, losses)),
                      mode="whole", timer=timer, last="train_lora")
    source, rows, adapter = sources[0], done.prompt, done.lora
    ident = identity(models, image_digest(image), prompt, resolution, settings)
    return LearnedState(source=source, prompt=prompt, resolution=resolution, rows=rows, adapter=adapter,
                        identity=ident, settings=dataclasses.replace(settings),
                        image=image if isinstance(image, str) else None, losses=losses, seconds=timer.seconds)


def save_learned(state: LearnedState, out_dir, *, overwrite: bool = False) -> Path:
    """Write ``state`` as a learned folder, atomically (nothing appears under ``out_dir`` until all is written)."""
    from .artifacts import versions

    src = state.source
    with stage_output(out_dir, "learn", run_id=state.key, overwrite=overwrite,
                      settings=state.settings.stage_dict()) as (tmp, record):
        src.image.save(tmp / "image.png")
        tensors = {"raw_features": src.raw_features.contiguous(),
                   "scale_schedule": torch.tensor(src.schedule, dtype=torch.int64)}
        tensors.update({f"bits_{k}": b.to(torch.uint8).contiguous() for k, b in enumerate(src.bits)})
        save_file(tensors, str(tmp / "codes.safetensors"))
        text = {}
        for name in SOURCE_TEXT:
            text.update(src.text[name].to_tensors(prefix=f"{name}/"))
        save_file(text, str(tmp / "text.safetensors"))
        save_embedding(state.rows, tmp / EMBEDDING_FILE, state.settings)
        (tmp / LORA_DIR).mkdir()
        save_adapter(state.adapter, tmp / LORA_DIR, state.settings)
        write_json(tmp / LEARNED_FILE, {
            "format": FORMAT, "key": state.key, "identity": state.identity, "image": state.image,
            "original_size": list(src.original_size), "schedule": [list(s) for s in src.schedule],
            "settings": state.settings.to_dict(), "losses": state.losses, "seconds": state.seconds,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        record["key"] = state.key
    return Path(out_dir)


def load_learned(learned_dir) -> LearnedState:
    """Read a learned folder (a local path, or a ``gs://`` / ``s3://`` URI fetched once into the local cache)."""
    from .. import storage

    if isinstance(learned_dir, str) and storage.is_remote(learned_dir):
        learned_dir = storage.cached_path(learned_dir)
    d = Path(learned_dir)
    if not (d / LEARNED_FILE).is_file():
        raise InvalidCaseError(f"{d} is not a learned folder (no {LEARNED_FILE}); write one with `editinfinity learn "
                               "--image I --prompt P --out DIR`")
    read_stage(d, "learn", needed_by="an edit with --learned")
    try:
        meta = json.loads((d / LEARNED_FILE).read_text())
        codes = load_file(str(d / "codes.safetensors"))
        text_t = load_file(str(d / "text.safetensors"))
        rows = load_file(str(d / EMBEDDING_FILE))["rows"]
        raw = load_file(str(d / LORA_DIR / ADAPTER_WEIGHTS))
        json.loads((d / LORA_DIR / ADAPTER_CONFIG).read_text())
        image = Image.open(d / "image.png").convert("RGB")
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise StageError(f"learned folder {d} is incomplete ({exc}); run `editinfinity learn` again") from exc
    if meta.get("format") != FORMAT:
        raise StageError(f"{d} holds learned state in format {meta.get('format')!r}, but this editinfinity "
                         f"({__version__}) reads {FORMAT!r}; run `editinfinity learn` again with this version")
    if learned_key(meta["identity"]) != meta.get("key"):
        raise StageError(f"{d / LEARNED_FILE} does not match its key (edited by hand?); run `editinfinity learn` "
                         "again")
    schedule = schedules.normalize_schedule(codes["scale_schedule"])
    source = SourceData(schedule=schedule, image=image, original_size=tuple(meta["original_size"]),
                        raw_features=codes["raw_features"], bits=[codes[f"bits_{k}"] for k in range(len(schedule))],
                        text={n: TextFeatures.from_tensors(text_t, prefix=f"{n}/") for n in SOURCE_TEXT})
    adapter = {k[len(PEFT_PREFIX):]: v for k, v in raw.items() if k.startswith(PEFT_PREFIX)}
    ident = meta["identity"]
    return LearnedState(source=source, prompt=ident["prompt"], resolution=ident["resolution"], rows=rows,
                        adapter=adapter, identity=ident, settings=EditSettings.from_dict(meta["settings"]),
                        image=meta.get("image"), losses=meta.get("losses", {}), seconds=meta.get("seconds", {}))


def check_compatible(state: LearnedState, models: ModelBundle, settings: EditSettings | None = None) -> None:
    """Refuse learned state made with other weights or learning settings than ``models`` / ``settings``."""
    ident = state.identity
    ours = identity(models, ident["image_digest"], ident["prompt"], ident["resolution"],
                    settings or state.settings)
    for name, what in (("preset", "--preset"), ("weights", "--weights"), ("frozen_dtype", "the weights' dtype")):
        if ours[name] != ident[name]:
            raise InvalidCaseError(f"the learned state was made with {name} {ident[name]!r}, these models have "
                                   f"{ours[name]!r}: edit with the same {what}, or learn the image again with these")
    diff = sorted(k for k in set(ours["settings"]) | set(ident["settings"])
                  if ours["settings"].get(k) != ident["settings"].get(k))
    if diff:
        shown = ", ".join(f"{k} {ident['settings'].get(k)!r} (asked {ours['settings'].get(k)!r})" for k in diff[:4])
        raise InvalidCaseError(f"the learned state was made with other learning settings: {shown}; leave them out "
                               "to use the learned ones, or learn the image again with these")


def edit_settings(state: LearnedState, overrides: dict) -> EditSettings:
    """The learned settings with ``overrides`` applied: edit-only settings and the seed may change; any other one
    must equal the learned value (else the edit would not be the one-shot edit it stands for)."""
    known = {f.name for f in dataclasses.fields(EditSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise InvalidCaseError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
    learned = state.settings.to_dict()
    bad = {k: v for k, v in overrides.items()
           if v is not None and k not in EDIT_ONLY_SETTINGS and k != "seed" and learned.get(k) != v}
    if bad:
        shown = ", ".join(f"{k}={v!r} (learned {learned.get(k)!r})" for k, v in sorted(bad.items()))
        raise InvalidCaseError(f"{shown}: these settings are fixed by the learned state; leave them out, or learn "
                               "the image again with them")
    values = {**learned, **{k: v for k, v in overrides.items() if v is not None}}
    out = EditSettings.from_dict(values)
    out.validate()
    if out.seed != state.settings.seed:
        log.info("sampling with seed %d; the state was learned with seed %d (a one-shot edit with seed %d would "
                 "also learn with it)", out.seed, state.settings.seed, out.seed)
    return out


def edit_case(models: ModelBundle, state: LearnedState, spec: CaseSpec,
              settings: EditSettings | None = None) -> CaseData:
    """The case of one edit of a learned image: the learned source half completed for ``spec``."""
    return case_from_source(models, state.source, spec, settings or state.settings)


def edit_spec(state: LearnedState, *, edit_prompt: str, mode: str, target_word: str | None = None,
              mask: str | None = None, mask_polarity: str = "white-edit") -> CaseSpec:
    """The case description of an edit of ``state`` (validated; files not re-read for the image)."""
    spec = CaseSpec(image=state.image or f"learned:{state.key}", prompt=state.prompt, edit_prompt=edit_prompt,
                    mode=mode, target_word=target_word, mask=mask, mask_polarity=mask_polarity,
                    resolution=state.resolution)
    spec.validate(check_files=False)  # the image was read when it was learned
    if mask is not None:
        CaseSpec._check_file("mask", mask)
    return spec


def cached_learn(cache_dir, models: ModelBundle, image, prompt: str, *, resolution: str | None = None,
                 settings: EditSettings | None = None, progress: bool = True) -> tuple[LearnedState, bool]:
    """The learned state of (image, prompt, resolution, models, settings) from ``cache_dir/<key>``, learned and
    stored there on a miss. Returns ``(state, hit)``. Concurrent learners of one key both succeed: the first
    published folder is kept."""
    from .prepare import _default_resolution

    settings = settings or EditSettings()
    resolution = resolution or _default_resolution(models)
    key = learned_key(identity(models, image_digest(image), prompt, resolution, settings))
    target = Path(cache_dir) / key
    if (target / LEARNED_FILE).is_file():
        try:
            state = load_learned(target)
        except (StageError, InvalidCaseError) as exc:
            log.warning("learned-state cache entry %s is unusable (%s); learning again", target, exc)
        else:
            log.info("learned state of %s from the cache (%s)", image if isinstance(image, str) else "image", key)
            return state, True
    state = learn(models, image, prompt, resolution=resolution, settings=settings, progress=progress)
    if state.key != key:  # cannot happen unless identity() changed between the two calls
        raise StageError(f"learned-state key changed while learning ({key} -> {state.key})")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    if (target / LEARNED_FILE).is_file():  # another worker published it meanwhile
        return state, False
    try:
        save_learned(state, target, overwrite=True)
    except OutputError as exc:  # another process is writing this entry (or won the rename): the cache is optional
        log.debug("learned-state cache entry %s is written concurrently (%s)", target, exc)
    except OSError as exc:  # a concurrent publish of the same key won the rename
        if not (target / LEARNED_FILE).is_file():
            raise
        log.debug("learned-state cache entry %s was published concurrently (%s)", target, exc)
    return state, False



def write_edit_stages(models: ModelBundle, state: LearnedState, spec: CaseSpec, stages_dir: Path,
                      settings: EditSettings | None = None) -> tuple[Path, Path, Path]:
    """The prepare, tune_prompt and train_lora stage directories of an edit of ``state`` (as a one-shot edit
    writes them), under ``stages_dir``: ``(case_dir, prompt_dir, lora_dir)``. Only the edit prompt is encoded."""
    from .prepare import save_case

    started = time.perf_counter()
    case = edit_case(models, state, spec, settings)
    case_dir, prompt_dir, lora_dir = stages_dir / "case", stages_dir / "prompt", stages_dir / "lora"
    with stage_output(case_dir, "prepare", run_id=case.run_id, started=started,
                      settings={"resolution": spec.resolution, "preset": models.preset, "learned": state.key}
                      ) as (tmp, record):
        save_case(case, tmp)
        record["schedule"] = [list(s) for s in case.schedule]
    with stage_output(prompt_dir, "tune_prompt", run_id=case.run_id, settings=state.settings.stage_dict()
                      ) as (tmp, record):
        save_embedding(state.rows, tmp / EMBEDDING_FILE, state.settings)
        record.update(learned=state.key, losses=state.losses.get("prompt_tuning", []))
    with stage_output(lora_dir, "train_lora", run_id=case.run_id, settings=state.settings.stage_dict()
                      ) as (tmp, record):
        save_adapter(state.adapter, tmp, state.settings)
        record.update(learned=state.key, losses=state.losses.get("lora", []))
    return case_dir, prompt_dir, lora_dir
