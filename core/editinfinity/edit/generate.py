"""Stage G, generate: sample from the edit prompt and blend source and generated codes at every scale.

At scale k the generated codes ``G_k`` (upsampled to the last grid) are mixed with the source codes ``S_k`` by the
keep weights: ``E_k = W * S_k + (1 - W) * G_k``; the running sum of ``E_k`` feeds the next scale and is decoded.
Where W = 1 at every scale the edited codes equal the source codes exactly, so far from the mask the edit equals the
reconstruction. Whole-image mode skips blending (plain generation with the learned prompt and LoRA).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ..models.bundle import ModelBundle
from ..models.quantizer import scale_codes_on_grid
from ..report import weights_picture
from .artifacts import stage_output
from .likelihood import edit_contrast, prompt_cross_entropy
from .lora import load_adapter, lora_adapter, lora_config
from .masking import WEIGHTS_FILE, load_band_weights
from .pixels import keep_source_pixels, to_bytes
from .prepare import CaseData, load_case, require_models
from .prompt_tuning import load_embedding
from .settings import EditSettings
from .training import make_generator, styled_text


def to_pil(img: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> RGB PIL, rounding to the nearest byte (:func:`editinfinity.edit.pixels.to_bytes`)."""
    return Image.fromarray(np.ascontiguousarray(to_bytes(img[:1])[0]))


@dataclass
class EditResult:
    edited: Image.Image  # the output: ``decoded`` with the source's pixels kept when settings.keep_pixels
    reconstruction: Image.Image
    edited_codes: torch.Tensor  # (1, d, hK, wK)
    bits: list[torch.Tensor]
    decoded: Image.Image | None = None  # the decode of the edited codes (the published method's output)
    weights: torch.Tensor | None = None  # the keep weights used (None: whole image)
    band: dict | None = None  # band="auto": the band kept and every candidate's scores (edit.likelihood)


def blend_hook(source_codes: list[torch.Tensor], weights: torch.Tensor):
    """The per-scale blending ``E_k = W S_k + (1 - W) G_k`` as a generation hook."""
    w = weights.to(source_codes[0].device, torch.float32)[None, None]

    def on_scale(k: int, generated: torch.Tensor) -> torch.Tensor:
        return w * source_codes[k] + (1 - w) * generated.float()

    return on_scale


@torch.no_grad()
def reconstruct(models: ModelBundle, case: CaseData) -> Image.Image:
    """Decode of the source codes: what the edit keeps where W = 1."""
    with models.autocast():
        img = models.vae.decode_bits([b.to(models.device) for b in case.bits], case.schedule)
    return to_pil(img)


@torch.no_grad()
def generate_edit(models: ModelBundle, case: CaseData, rows: torch.Tensor | None, adapter: dict | None,
                  weights: torch.Tensor | dict[str, torch.Tensor] | None, settings: EditSettings | None = None,
                  adapter_settings: EditSettings | None = None) -> EditResult:
    """Generate the edit. ``weights`` None = whole-image mode; ``adapter`` None = no LoRA. ``weights`` may map
    band names to keep weights (``masking.band_weights``): with more than one, the edit is generated once per band
    with the same sampling noise and the one the model scores closest to the edit prompt is kept
    (:mod:`editinfinity.edit.likelihood`)."""
    settings = settings or EditSettings()
    reconstruction = reconstruct(models, case)  # once, whatever number of candidates
    if isinstance(weights, dict):
        if len(weights) != 1:
            return _best_band(models, case, rows, adapter, weights, settings, adapter_settings, reconstruction)
        weights = next(iter(weights.values()))
    return _sample_edit(models, case, rows, adapter, weights, settings, adapter_settings, reconstruction)


def _sample_edit(models: ModelBundle, case: CaseData, rows: torch.Tensor | None, adapter: dict | None,
                 weights: torch.Tensor | None, settings: EditSettings, adapter_settings: EditSettings | None,
                 reconstruction: Image.Image) -> EditResult:
    """One sampling of the edit with one keep-weight map (None: whole image), from ``settings.seed``."""
    text = styled_text(case, "edit_styled", rows, models.device) if rows is not None else \
        case.text["edit_styled"].to(models.device)
    hook = None
    if weights is not None:
        source = scale_codes_on_grid([b.to(models.device) for b in case.bits], case.schedule)
        hook = blend_hook(source, weights)
    gen = make_generator(models.device, settings.seed)

    def run():
        with models.autocast():
            out = models.transformer.generate(text, case.schedule, cfg=settings.cfg, tau=settings.tau,
                                              top_k=settings.top_k, top_p=settings.top_p, generator=gen,
                                              on_scale=hook)
            img = models.vae.decode(out.summed_codes)
        return out, img

    if adapter is not None:
        with lora_adapter(models.transformer, lora_config(adapter_settings or settings), adapter):
            out, img = run()
    else:
        out, img = run()
    decoded = to_pil(img)
    edited = keep_source_pixels(case.image, decoded, weights) if weights is not None and settings.keep_pixels \
        else decoded
    return EditResult(edited=edited, reconstruction=reconstruction, decoded=decoded,
                      edited_codes=out.summed_codes.float().cpu(), bits=[b.cpu() for b in out.bits],
                      weights=weights)


def _best_band(models: ModelBundle, case: CaseData, rows, adapter, candidates: dict[str, torch.Tensor],
               settings: EditSettings, adapter_settings: EditSettings | None,
               reconstruction: Image.Image) -> EditResult:
    """One edit per candidate band (each from the same seed), scored with the base model (the adapter is off
    once ``_sample_edit`` returns); the lowest edit-minus-source cross-entropy wins, the first band on a tie."""
    results, scores = {}, {}
    for name, w in candidates.items():
        results[name] = _sample_edit(models, case, rows, adapter, w, settings, adapter_settings, reconstruction)
        scores[name] = prompt_cross_entropy(models, case, results[name].edited)
    best = min(candidates, key=lambda name: edit_contrast(scores[name]))
    record = {"chosen": best, "rule": "lowest edit-prompt minus source-prompt bit cross-entropy",
              "candidates": {name: {**{k: round(v, 6) for k, v in sc.items()},
                                    "contrast": round(edit_contrast(sc), 6)} for name, sc in scores.items()}}
    return dataclasses.replace(results[best], band=record)


def generate(case_dir, prompt_dir, lora_dir, out_dir, *, mask_dir=None, seed: int = 0,
             models: ModelBundle | None = None, settings: EditSettings | None = None,
             overwrite: bool = False) -> Path:
    """Stage G over files: writes ``edited.png``, ``decoded.png`` (before kept pixels), ``source.png`` (the picture
    the model encoded), ``reconstruction.png`` and ``edited_codes.safetensors``; when the mask stage's band was
    ``auto``, also the keep weights of the band kept (``weights.safetensors``, ``weights.png``; ``stage.json``
    ``band`` says which and why)."""
    from ..models.bundle import load_models

    case = load_case(case_dir)
    rows = load_embedding(prompt_dir, run_id=case.run_id) if prompt_dir is not None else None
    adapter, adapter_settings = load_adapter(lora_dir, run_id=case.run_id) if lora_dir is not None else (None, None)
    weights = load_band_weights(mask_dir, case) if case.spec.mode != "whole" else None
    models = models or load_models(case.preset)
    identity = require_models(case, models, stage="generate")
    started = time.perf_counter()  # after loading: the stage's own work
    settings = dataclasses.replace(settings or EditSettings(), seed=seed)  # the caller's settings stay as they are
    result = generate_edit(models, case, rows, adapter, weights, settings, adapter_settings)
    with stage_output(out_dir, "generate", run_id=case.run_id, overwrite=overwrite, started=started,
                      settings=settings.stage_dict()) as (tmp, record):
        # Fast zlib level: the same pixels, a slightly larger file, a fraction of the encoding time at 1M.
        result.edited.save(tmp / "edited.png", compress_level=1)
        result.reconstruction.save(tmp / "reconstruction.png", compress_level=1)
        result.decoded.save(tmp / "decoded.png", compress_level=1)
        case.image.save(tmp / "source.png", compress_level=1)
        save_file({"edited_codes": result.edited_codes.contiguous()}, str(tmp / "edited_codes.safetensors"))
        record["mode"] = case.spec.mode
        record["keep_pixels"] = bool(weights is not None and settings.keep_pixels)
        record["models"] = identity
        if result.band is not None:  # band "auto": the weights kept, for the summary and the report
            record["band"] = result.band
            save_file({"weights": result.weights.float().contiguous()}, str(tmp / WEIGHTS_FILE))
            weights_picture(result.weights.numpy(), (case.image.width, case.image.height)).save(tmp / "weights.png")
    return Path(out_dir)
