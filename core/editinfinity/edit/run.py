"""All stages of one edit in one process (models loaded once), and the summary/report step.

``run_edit`` writes every stage directory under ``OUT/stages/`` (so any stage can be re-run or resumed with the
per-stage commands) and the user-facing outputs at the top of ``OUT``: ``edited.png``, ``reconstruction.png``,
``mask.png``/``weights.png`` (modes with a mask), ``attention.png`` (mode auto), ``report.html`` and ``summary.json``.
``OUT`` appears only once everything is written. The steps run through ``edit.sequence.run_stages`` (the one
sequence the Python pipeline and learning run too), timed under its keys.

With ``settings.low_memory`` the T5 encoder leaves the GPU after prepare (and comes back for the next edit's
prepare), every training block is checkpointed and cached GPU memory is released between stages; those moves are
timed with the stage they follow.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..metrics import background_metrics
from ..models.bundle import ModelBundle, load_models
from ..models.presets import default_resolution
from ..outputs import claim_output
from ..report import side_by_side
from ..report_page import write_edit_report
from .artifacts import read_stage, read_tensors, versions, write_json
from .attention import attention, load_attention
from .case import CaseSpec
from .generate import generate
from .learned import LearnedState, cached_learn, check_compatible, edit_spec, write_edit_stages
from .lora import train_lora
from .masking import WEIGHTS_FILE, load_weights, make_mask, used_weights_dir
from .prepare import _default_resolution, load_case, prepare
from .prompt_tuning import tune_prompt
from .representation import representation_check
from .sequence import StageTimer, Steps, run_stages
from .settings import EditSettings

log = logging.getLogger(__name__)


def edit_metrics(edited: Image.Image, reconstruction: Image.Image, keep: np.ndarray | None,
                 source: Image.Image | None = None) -> dict:
    """Background PSNR (dB) / MSE / SSIM of the edit against the reconstruction (PnP-Inversion's protocol: pixels
    outside the keep region are zeroed in both images), and with ``source`` the same against the source
    (``source_*``: what a user compares with); whole-image figures when there is no mask."""
    region = np.zeros((edited.height, edited.width), bool) if keep is None else ~keep
    out = {"region": "whole image"} if keep is None else {"region": "background (keep weight 1)",
                                                           "pixels": int(keep.sum())}
    out.update(background_metrics(reconstruction, edited, region))
    if source is not None:
        out.update({f"source_{k}": v for k, v in background_metrics(source, edited, region).items()})
    return out


def keep_region_pixels(weights: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose latent cell has keep weight 1 (nearest upsampling of the grid to the image size (H, W))."""
    grid = (weights >= 1.0).float()[None, None]
    up = torch.nn.functional.interpolate(grid, size=size, mode="nearest")[0, 0]
    return up.bool().numpy()


def summarize(out_dir, *, case_dir, generate_dir, mask_dir=None, attention_dir=None, timings: dict | None = None,
              settings: EditSettings | None = None, extra: dict | None = None) -> Path:
    """Write ``summary.json`` and a self-contained ``report.html`` (and copy the pictures) into ``out_dir``.

    Also checks that the preset can represent the source (``edit.representation``): below the preset's floor a
    warning is logged and written to the summary (``representation``) and the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    case = load_case(case_dir)
    record = read_stage(generate_dir, "generate", run_id=case.run_id, needed_by="the summary")
    edited = Image.open(Path(generate_dir) / "edited.png").convert("RGB")
    recon = Image.open(Path(generate_dir) / "reconstruction.png").convert("RGB")
    source = case.image
    pictures = {"source": source, "reconstruction": recon, "edited": edited}
    keep = weights = edit_mask = amap = None
    if mask_dir is not None:
        edit_mask, weights = load_weights(mask_dir, run_id=case.run_id)
        used = used_weights_dir(mask_dir, generate_dir, record)  # band "auto": the band the generate stage kept
        weights = read_tensors(used / WEIGHTS_FILE, "generate")["weights"] if used != Path(mask_dir) else weights
        keep = keep_region_pixels(weights, (edited.height, edited.width))
        for name, folder in (("mask.png", Path(mask_dir)), ("weights.png", used)):
            shutil.copyfile(folder / name, out_dir / name)
        pictures["mask (white = edit)"] = Image.open(out_dir / "mask.png").convert("RGB")
    if attention_dir is not None:
        amap = load_attention(attention_dir, run_id=case.run_id)
        shutil.copyfile(Path(attention_dir) / "attention.png", out_dir / "attention.png")
        pictures[f"attention: {case.spec.target_word}"] = Image.open(out_dir / "attention.png").convert("RGB")
    for name in ("edited.png", "reconstruction.png"):
        shutil.copyfile(Path(generate_dir) / name, out_dir / name)
    source.save(out_dir / "source.png")  # the picture the model encoded, at the output size
    metrics = edit_metrics(edited, recon, keep, source=source)
    representation = representation_check(source, recon, case.preset)
    if representation["warning"]:
        log.warning("%s", representation["warning"])
    summary = {"spec": case.spec.to_dict(), "schedule": [list(s) for s in case.schedule],
               "image_size": [case.image.height, case.image.width], "run_id": case.run_id, "preset": case.preset,
               "settings": settings.effective_dict(case.preset) if settings else None, "seconds": timings or {},
               "keep_pixels": bool(record.get("keep_pixels", False)), "band": record.get("band"),
               "metrics": metrics,
               "representation": representation, "versions": versions(), **(extra or {})}
    write_json(out_dir / "summary.json", summary)
    side_by_side(list(pictures.items())).save(out_dir / "before_after.png")
    write_edit_report(out_dir / "report.html", source=source, edited=edited, reconstruction=recon,
                      edit_mask=edit_mask, weights=weights, attention=amap, summary=summary)
    return out_dir


def run_edit(out_dir, *, image=None, prompt: str | None = None, edit_prompt: str, mode: str = "auto",
             target_word: str | None = None, mask: str | None = None, mask_polarity: str = "white-edit",
             resolution: str | None = None, preset: str | None = None, weights: str | None = None,
             device: str | None = None, models: ModelBundle | None = None,
             models_loader: Callable[[], ModelBundle] | None = None, settings: EditSettings | None = None,
             overwrite: bool = False, progress: bool = True, learned: LearnedState | None = None,
             learned_cache: str | os.PathLike | None = None) -> Path:
    """Run every stage of one edit in this process and write the outputs to ``out_dir`` atomically.

    Models: ``models`` (loaded by the caller before this run: the summary then has no ``load_models`` time), else
    ``models_loader()``, else ``load_models(preset, weights=, device=)``; the last two are timed as ``load_models``.

    ``learned``: learned state of the image (``editinfinity.edit.learned``); prompt tuning and LoRA are then not
    run, and ``image``/``prompt``/``resolution`` come from it. ``learned_cache``: a folder of learned states keyed
    by content; the image is learned there on a miss and reused on a hit. Either gives the one-shot edit's pixels.
    """
    settings = settings or (learned.settings if learned is not None else EditSettings())
    # Validate the case before paying for model loading.
    if learned is None:
        CaseSpec(image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode, target_word=target_word, mask=mask,
                 mask_polarity=mask_polarity, resolution=resolution or default_resolution(preset)).validate()
    else:
        spec = edit_spec(learned, edit_prompt=edit_prompt, mode=mode, target_word=target_word, mask=mask,
                         mask_polarity=mask_polarity)
    # The output is claimed before the models load: a target we may not write fails at once.
    with claim_output(out_dir, overwrite=overwrite, inputs=(image, mask), what="edit") as tmp:
        timer = StageTimer(models, release_memory=settings.low_memory)
        if models is None:
            models = timer("load_models", models_loader or partial(
                load_models, preset, weights=weights, device=device, bias_mode=settings.bias_mode))
        extra: dict = {}
        if learned is None and learned_cache is not None:
            learned, hit = timer("learn", cached_learn, learned_cache, models, image, prompt, resolution=resolution,
                                 settings=settings, progress=progress)
            extra["learned_cache_hit"] = hit
            spec = edit_spec(learned, edit_prompt=edit_prompt, mode=mode, target_word=target_word, mask=mask,
                             mask_polarity=mask_polarity)
        if learned is not None:
            check_compatible(learned, models, settings)
            extra["learned"] = learned.key
        st = tmp / "stages"
        # Steps 4-6 over stage directories (edit.sequence runs them in order, for the modes that have them).
        later = {"attention": lambda case_dir: attention(case_dir, st / "attention", models=models),
                 "mask": lambda case_dir, attention_dir: make_mask(
                     case_dir, st / "mask", attention_dir=attention_dir, threshold=settings.threshold,
                     band=settings.band, core=settings.core, fill_holes=settings.fill_holes,
                     min_region=settings.min_region),
                 "generate": lambda case_dir, prompt_dir, lora_dir, mask_dir: generate(
                     case_dir, prompt_dir, lora_dir, st / "generate", mask_dir=mask_dir, seed=settings.seed,
                     models=models, settings=settings)}
        if learned is not None:
            st.mkdir()
            steps = Steps(prepare=partial(write_edit_stages, models, learned, spec, st, settings), learned=True,
                          **later)
        else:
            steps = Steps(
                prepare=partial(_prepare_step, models, settings, st / "case", image=image, prompt=prompt,
                                edit_prompt=edit_prompt, mode=mode, target_word=target_word, mask=mask,
                                mask_polarity=mask_polarity, resolution=resolution or _default_resolution(models)),
                tune_prompt=lambda case_dir: tune_prompt(case_dir, st / "prompt", iters=settings.prompt_iters,
                                                         seed=settings.seed, models=models, settings=settings,
                                                         progress=progress),
                train_lora=lambda case_dir, prompt_dir: train_lora(
                    case_dir, prompt_dir, st / "lora", iters=settings.lora_iters, seed=settings.seed, models=models,
                    settings=settings, progress=progress),
                **later)
        dirs = run_stages(steps, mode=mode, timer=timer)
        timings = timer.record()
        extra["models"] = {"preset": models.preset, "source": models.source, "device": str(models.device),
                           "frozen_dtype": str(models.frozen_dtype).removeprefix("torch.")}
        if timer.cuda:
            # Running maximum of allocated GPU memory after each stage: the stage where it rises set the peak.
            extra["peak_gpu_memory_gb_after_stage"] = timer.memory
        summarize(tmp, case_dir=dirs.case, generate_dir=dirs.generate, mask_dir=dirs.mask,
                  attention_dir=dirs.attention, timings=timings, settings=settings, extra=extra)
    log.info("edit written to %s (%.1f s)", out_dir, timings.get("total", 0.0))
    return out_dir if "://" in str(out_dir) else Path(out_dir)


def _prepare_step(models: ModelBundle, settings: EditSettings, out_dir, **case) -> Path:
    """Stage A over files; with the low-memory setting T5 is on the GPU only meanwhile."""
    if settings.low_memory:
        models.onload_text_encoder()
    out = prepare(out_dir, models=models, settings=settings, **case)
    if settings.low_memory:
        models.offload_text_encoder()
    return out
