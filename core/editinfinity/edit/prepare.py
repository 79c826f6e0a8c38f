"""Stage A, prepare: the image's exact multi-scale bit codes (BSQ VAE) and every prompt's T5 features.

This is the only stage that runs the VAE encoder and T5 (docs/method.md, section 1): later stages read ``codes.safetensors`` and
``text.safetensors`` from the case directory. The schedule comes from the image's aspect ratio (nearest template)
and the chosen pixel budget; the image is preprocessed once (RGB, cover-resize, centre crop) and that same tensor
serves the codes, training and reports (docs/method.md, section 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from ..errors import InvalidCaseError, StageError
from ..models import schedules
from ..models.bundle import ModelBundle
from ..models.presets import default_resolution
from ..models.quantizer import multiscale_quantize
from ..models.text import TextFeatures, encode_prompts, style_prompt, target_token_range
from .artifacts import read_stage, read_tensors, stage_output
from .case import CaseSpec
from .images import choose_schedule, load_image, preprocess_image
from .settings import EditSettings
from .user_mask import load_user_mask

log = logging.getLogger(__name__)

#: The prompt variants later stages need (docs/method.md, section 1).
TEXT_VARIANTS = ("source_styled", "edit_styled", "source_plain")
#: Written by every prepare since ``band="auto"`` (edit.likelihood scores pictures under it); cases prepared
#: before lack it.
OPTIONAL_TEXT_VARIANTS = ("edit_plain",)


@dataclass
class CaseData:
    """Everything the later stages read, in memory."""

    spec: CaseSpec
    schedule: list
    image: Image.Image  # the preprocessed pixels (template size)
    raw_features: torch.Tensor  # (1, d, hK, wK) encoder output, for bitwise self-correction
    bits: list[torch.Tensor]  # per scale (1, h_k, w_k, d) uint8
    text: dict[str, TextFeatures]
    target_range: tuple[int, int] | None
    user_cells: torch.Tensor | None  # (hK, wK) fraction of edit pixels per latent cell (mode "mask")
    user_pixels: torch.Tensor | None  # (H, W) bool pixel edit mask (mode "mask")
    run_id: str
    preset: str
    #: ``ModelBundle.identity`` of the models that prepared the case (None for cases of older versions).
    models: dict | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return schedules.last_grid(self.schedule)


def _run_id(spec: CaseSpec, image: Image.Image, preset: str, resolution: str) -> str:
    h = hashlib.sha256()
    h.update(image.tobytes())
    h.update(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{preset}|{resolution}".encode())
    return h.hexdigest()[:16]


@dataclass
class SourceData:
    """The source half of a case (what learning needs): the image's exact codes and the source prompt's features.

    It depends on the image, the source prompt, the pixel budget and the models only, so learned state built from
    it serves any number of edit prompts (``editinfinity.edit.learned``).
    """

    schedule: list
    image: Image.Image  # the preprocessed pixels (template size)
    original_size: tuple[int, int]  # the input image's PIL size (W, H), to align user masks
    raw_features: torch.Tensor
    bits: list[torch.Tensor]
    text: dict[str, TextFeatures]  # "source_styled", "source_plain"

    @property
    def grid(self) -> tuple[int, int]:
        return schedules.last_grid(self.schedule)


def _text_encoder(models: ModelBundle):
    if models.text_encoder is None:
        raise StageError("prepare needs the T5 text encoder, but these models were loaded without it "
                         "(load_models(..., text_encoder=True))")
    return models.text_encoder


@torch.no_grad()
def encode_image(models: ModelBundle, original: Image.Image, resolution: str):
    """The schedule, the preprocessed picture, the VAE's raw features and their exact multi-scale codes."""
    schedule = choose_schedule(original, resolution)
    pixels, pre = preprocess_image(original, schedule)
    z = models.vae.encode_raw(pixels.to(models.device)).float()
    return schedule, pre, z, multiscale_quantize(z, schedule)


@torch.no_grad()
def encode_source(models: ModelBundle, image, prompt: str, resolution: str,
                  settings: EditSettings | None = None) -> SourceData:
    """Preprocess and quantise the image exactly, and encode the source prompt (styled and plain)."""
    settings = settings or EditSettings()
    original = load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    schedule, pre, z, codes = encode_image(models, original, resolution)
    tok, enc = models.tokenizer, _text_encoder(models)
    text = {
        "source_styled": encode_prompts(tok, enc, [style_prompt(prompt)], extra_rows=settings.style_rows).to("cpu"),
        "source_plain": encode_prompts(tok, enc, [prompt]).to("cpu"),
    }
    return SourceData(schedule=schedule, image=pre, original_size=original.size, raw_features=z.cpu(),
                      bits=[b.cpu() for b in codes.bits], text=text)


@torch.no_grad()
def case_from_source(models: ModelBundle, source: SourceData, spec: CaseSpec,
                     settings: EditSettings | None = None) -> CaseData:
    """Complete ``source`` into the case of ``spec``: the edit prompt's features, the target word's tokens (mode
    auto) or the user mask on the grid (mode mask)."""
    settings = settings or EditSettings()
    spec.warn_if_reconstruction()
    tok, enc = models.tokenizer, _text_encoder(models)
    text = {**source.text, "edit_styled": encode_prompts(tok, enc, [style_prompt(spec.edit_prompt)],
                                                         extra_rows=settings.style_rows).to("cpu"),
            "edit_plain": encode_prompts(tok, enc, [spec.edit_prompt]).to("cpu")}
    image = source.image
    target_range = None
    if spec.mode == "auto":
        target_range = target_token_range(tok, spec.prompt, spec.target_word)
    user_cells = user_pixels = None
    if spec.mode == "mask":
        user_pixels, user_cells = load_user_mask(spec.mask, (image.height, image.width), source.grid,
                                                 polarity=spec.mask_polarity, original_size=source.original_size)
        user_pixels, user_cells = torch.as_tensor(user_pixels), torch.as_tensor(user_cells, dtype=torch.float64)
    return CaseData(spec=spec, schedule=source.schedule, image=image, raw_features=source.raw_features,
                    bits=list(source.bits), text=text, target_range=target_range,
                    user_cells=user_cells, user_pixels=user_pixels,
                    run_id=_run_id(spec, image, models.preset, spec.resolution), preset=models.preset,
                    models=models.identity)


def prepare_case(models: ModelBundle, spec: CaseSpec, settings: EditSettings | None = None) -> CaseData:
    """Encode one case: preprocess the image, quantise it exactly, encode the prompts, map the target word."""
    if spec.resolution is None:  # the preset's budget (CaseSpec: None = not given)
        spec = dataclasses.replace(spec, resolution=_default_resolution(models))
    spec.validate()
    source = encode_source(models, spec.image, spec.prompt, spec.resolution, settings)
    return case_from_source(models, source, spec, settings)


def save_case(case: CaseData, directory: Path) -> None:
    """Write the case artifact files into ``directory`` (already a temporary stage directory)."""
    case.image.save(directory / "image.png")
    tensors = {"raw_features": case.raw_features.contiguous(),
               "scale_schedule": torch.tensor(case.schedule, dtype=torch.int64)}
    for k, b in enumerate(case.bits):
        tensors[f"bits_{k}"] = b.to(torch.uint8).contiguous()
    save_file(tensors, str(directory / "codes.safetensors"))
    text_tensors = {}
    for name, feats in case.text.items():
        text_tensors.update(feats.to_tensors(prefix=f"{name}/"))
    save_file(text_tensors, str(directory / "text.safetensors"))
    if case.user_cells is not None:
        save_file({"cell_fraction": case.user_cells.double().contiguous(),
                   "pixel_edit_mask": case.user_pixels.to(torch.uint8).contiguous()},
                  str(directory / "user_mask.safetensors"))
    meta = {"spec": case.spec.to_dict(), "schedule": [list(s) for s in case.schedule],
            "grid": list(case.grid), "image_size": [case.image.height, case.image.width],
            "target_range": list(case.target_range) if case.target_range else None,
            "run_id": case.run_id, "preset": case.preset, "models": case.models}
    (directory / "case.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def load_case(case_dir: str | Path) -> CaseData:
    """Read a case directory written by :func:`prepare`."""
    case_dir = Path(case_dir)
    rec = read_stage(case_dir, "prepare", needed_by="this stage")
    try:
        meta = json.loads((case_dir / "case.json").read_text())
        codes = read_tensors(case_dir / "codes.safetensors", "prepare")
        text_t = read_tensors(case_dir / "text.safetensors", "prepare")
        image = Image.open(case_dir / "image.png").convert("RGB")
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"case directory {case_dir} is incomplete ({exc}); re-run prepare") from exc
    schedule = schedules.normalize_schedule(codes["scale_schedule"])
    bits = [codes[f"bits_{k}"] for k in range(len(schedule))]
    text = {name: TextFeatures.from_tensors(text_t, prefix=f"{name}/") for name in TEXT_VARIANTS}
    text.update({name: TextFeatures.from_tensors(text_t, prefix=f"{name}/") for name in OPTIONAL_TEXT_VARIANTS
                 if any(key.startswith(f"{name}/") for key in text_t)})
    user_cells = user_pixels = None
    if (case_dir / "user_mask.safetensors").is_file():
        um = read_tensors(case_dir / "user_mask.safetensors", "prepare")
        user_cells, user_pixels = um["cell_fraction"], um["pixel_edit_mask"].bool()
    spec = CaseSpec.from_dict(meta["spec"])
    tr = meta.get("target_range")
    return CaseData(spec=spec, schedule=schedule, image=image, raw_features=codes["raw_features"], bits=bits,
                    text=text, target_range=tuple(tr) if tr else None, user_cells=user_cells,
                    user_pixels=user_pixels, run_id=rec["run_id"], preset=meta.get("preset", ""),
                    models=meta.get("models"))


def prepare(out_dir, *, image, prompt: str, edit_prompt: str, mode: str = "auto", target_word: str | None = None,
            mask: str | None = None, mask_polarity: str = "white-edit", resolution: str | None = None,
            preset: str | None = None, models: ModelBundle | None = None, overwrite: bool = False,
            settings: EditSettings | None = None) -> Path:
    """Stage A as a function over files: writes the case directory ``out_dir``."""
    from ..models.bundle import load_models

    models = models or load_models(preset)
    started = time.perf_counter()  # after loading: the stage's own work
    spec = CaseSpec(image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode, target_word=target_word,
                    mask=mask, mask_polarity=mask_polarity,
                    resolution=resolution or _default_resolution(models))
    case = prepare_case(models, spec, settings)
    with stage_output(out_dir, "prepare", run_id=case.run_id, overwrite=overwrite, started=started,
                      settings={"resolution": spec.resolution, "preset": models.preset}) as (tmp, record):
        save_case(case, tmp)
        record["schedule"] = [list(s) for s in case.schedule]
    return Path(out_dir)


def _default_resolution(models: ModelBundle) -> str:
    return default_resolution(models.preset)


def require_models(case: CaseData, models: ModelBundle, *, stage: str) -> dict:
    """Refuse models other than the ones that prepared the case (a stage would silently mix two models); returns
    the identity to record in the stage's ``stage.json``."""
    have = models.identity
    want = case.models or {"preset": case.preset}
    if want.get("preset") != have["preset"] or want.get("config_digest", have["config_digest"]) != have["config_digest"]:
        def name(i: dict) -> str:
            return f"{i.get('preset')!r}" + (f" (configs {i['config_digest']})" if i.get("config_digest") else "")

        raise StageError(f"the case was prepared with preset {name(want)}, but the {stage} stage loaded preset "
                         f"{name(have)}; pass --preset {want.get('preset')} (and the same --weights), or re-run "
                         "prepare with these models")
    return have


def require_mode(case: CaseData, *modes: str, stage: str) -> None:
    if case.spec.mode not in modes:
        raise InvalidCaseError(f"the {stage} stage applies to mode(s) {', '.join(modes)}, "
                               f"but this case is mode {case.spec.mode!r}")
