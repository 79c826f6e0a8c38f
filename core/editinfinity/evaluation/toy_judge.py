"""Judging a toy-world model without any learned judge: reconstruction PSNR, text-to-image attributes, edits.

Every verdict comes from ``toyworld.analyse`` (pixels -> palette colours -> shapes). Scenes and edit cases use
integer seeds from :data:`~editinfinity.train.data.HELDOUT_SEED_BASE` / :data:`~editinfinity.train.data.EDIT_SEED_BASE`
on, which training never draws (see :mod:`editinfinity.train.data`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import toyworld
from ..edit.mask import cell_fractions_from_pixels
from ..edit.masking import CELL_THRESHOLD
from ..edit.modes import MODES
from ..edit.pixels import to_bytes
from ..metrics import psnr
from ..models import schedules
from ..models.text import encode_prompts
from ..scratch import scratch_dir
from ..train.common import autocast
from ..train.data import EDIT_SEED_BASE, heldout_scenes

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------------
# text to image


def judge_generation(image: np.ndarray | Image.Image, scene: toyworld.Scene) -> dict[str, Any]:
    """Does a picture show what ``scene``'s caption asks for?

    ``objects_ok``: every prompted object is found with its colour and kind (the toy model's target, see its model card);
    ``matches``: also the background colour and no extra object (``toyworld.matches``).
    """
    verdict = toyworld.analyse(image, scene)["expected"]
    return {
        "objects_ok": all(o["colour_ok"] and o["kind_ok"] for o in verdict["objects"]),
        "matches": bool(verdict["matches"]),
        "background_ok": bool(verdict["background_ok"]),
        "extra_objects": int(verdict["extra_objects"]),
        "objects": len(scene.shapes),
    }


@torch.no_grad()
def generate_pictures(transformer, vae, tokenizer, text_encoder, prompts: Sequence[str], schedule, *,
                      cfg: float = 4.0, tau: float = 0.5, top_k: int = 900, top_p: float = 0.97, seed: int = 0,
                      batch: int = 32) -> list[np.ndarray]:
    """Text-to-image with the plain prompts: ``(H, W, 3)`` uint8 pictures, one per prompt."""
    device = next(transformer.parameters()).device
    out: list[np.ndarray] = []
    gen = torch.Generator(device=device).manual_seed(int(seed))
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i:i + batch])
        text = encode_prompts(tokenizer, text_encoder, chunk).to(device)  # float32, as the prepare stage
        with autocast(device):  # as the generate stage: bf16 on GPU
            res = transformer.generate(text, schedule, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, generator=gen)
            img = vae.decode(res.summed_codes)
        out += list(to_bytes(img))
    return out


def text_to_image_eval(transformer, vae, tokenizer, text_encoder, n: int, *, resolution: str = "0.06M",
                       schedule=None, cfg: float | Sequence[float] = 4.0, tau: float | Sequence[float] = 0.5,
                       top_k: int = 900, top_p: float = 0.97, seed: int = 0, batch: int = 32,
                       scenes: Sequence[toyworld.Scene] | None = None) -> dict[str, Any]:
    """Generate from the captions of ``n`` held-out scenes (or of ``scenes``) and judge each picture (rates and
    per-case verdicts). ``cfg`` / ``tau``: one value or one per scale (``generate_pictures``).

    The square ``schedule`` defaults to the one of ``resolution``.
    """
    schedule = schedule if schedule is not None else schedules.get_schedule(1.0, resolution)
    H, W = schedules.pixel_size(schedule)
    scenes = list(scenes) if scenes is not None else heldout_scenes(n, W, H)
    was = [m.training for m in (transformer, vae, text_encoder)]
    for m in (transformer, vae, text_encoder):
        m.eval()
    t0 = time.perf_counter()
    try:
        pictures = generate_pictures(transformer, vae, tokenizer, text_encoder,
                                     [toyworld.caption(s) for s in scenes], schedule, cfg=cfg, tau=tau,
                                     top_k=top_k, top_p=top_p, seed=seed, batch=batch)
    finally:
        for m, w in zip((transformer, vae, text_encoder), was, strict=True):
            m.train(w)
    seconds = time.perf_counter() - t0
    cases = []
    for s, pic in zip(scenes, pictures, strict=True):
        cases.append({"caption": toyworld.caption(s), **judge_generation(pic, s)})
    return {"generations": len(cases), **_rates(cases, ("objects_ok", "matches", "background_ok")),
            "by_objects": {str(k): _rates([c for c in cases if c["objects"] == k], ("objects_ok", "matches"))
                           for k in (1, 2)},
            "cfg": cfg, "tau": tau, "seconds": round(seconds, 2), "cases": cases}


def _rates(cases: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(cases)}
    for k in keys:
        out[f"{k}_rate"] = float(np.mean([bool(c[k]) for c in cases])) if cases else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# edits


def keep_region(edit_mask: np.ndarray, cell: int = 16, dilate_cells: int = 1) -> np.ndarray:
    """Pixels outside ``edit_mask`` dilated to latent cells: every cell touching the mask, grown by
    ``dilate_cells`` cells (8-neighbourhood), is excluded. Returns bool ``(H, W)``, True = must be kept."""
    m = torch.as_tensor(np.asarray(edit_mask, dtype=bool)).float()[None, None]
    H, W = m.shape[-2:]
    if H % cell or W % cell:
        raise ValueError(f"mask size {H}x{W} is not a multiple of the {cell}px latent cell")
    cells = torch.nn.functional.max_pool2d(m, cell)
    if dilate_cells > 0:
        k = 2 * dilate_cells + 1
        cells = torch.nn.functional.max_pool2d(cells, k, stride=1, padding=dilate_cells)
    pix = torch.nn.functional.interpolate(cells, size=(H, W), mode="nearest")[0, 0]
    return ~pix.bool().numpy()


def edit_cases(n: int, base: int = EDIT_SEED_BASE, width: int = 256, height: int = 256) -> list[dict[str, Any]]:
    """``n`` edit cases (one object's colour or kind changes) from ``toyworld.make_edit_case`` with the seeds
    ``base, base+1, ...`` (default: the held-out ones); ``case`` numbers them from ``base`` (the seed's offset)."""
    return [{**toyworld.make_edit_case(base + i, width, height), "case": i} for i in range(n)]


def judge_edit(case: dict[str, Any], edited: np.ndarray, reconstruction: np.ndarray | None = None,
               cell: int = 16) -> dict[str, Any]:
    """Verdicts of one edit: the edited object as requested, and the untouched region preserved.

    ``present``: an object with the edited object's new colour *and* kind is found (the requested attribute with
    the object it belongs to); ``attribute_only``: some object has the requested colour (or kind); ``matches``:
    the whole picture equals the ideal edit's attributes; ``psnr_outside``: PSNR against the source picture
    outside the true edit region dilated by one latent cell (also against the VAE reconstruction when given).
    """
    new = case["edited_scene"].shapes[case["index"]]
    attr = {"colour": new.colour} if case["attribute"] == "colour" else {"kind": new.kind}
    keep = keep_region(case["mask"], cell)
    source = np.asarray(case["image"].convert("RGB"))
    out = {
        "present": toyworld.attribute_present(edited, colour=new.colour, kind=new.kind),
        "attribute_only": toyworld.attribute_present(edited, **attr),
        "matches": toyworld.matches(edited, case["edited_scene"]),
        "psnr_outside": _finite(psnr(source, edited, mask=keep)),
        "keep_fraction": float(keep.mean()),
    }
    if reconstruction is not None:
        out["psnr_outside_vs_reconstruction"] = _finite(psnr(reconstruction, edited, mask=keep))
        out["reconstruction_psnr"] = _finite(psnr(source, reconstruction))
    return out


def _finite(v: float) -> float:
    return float(v) if math.isfinite(v) else 99.0  # identical pixels: report a ceiling instead of inf


def _cells(mask: np.ndarray, cell: int) -> np.ndarray:
    """Cells touched by at least one pixel of ``mask`` (the measure before the fifth session, kept for comparison)."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool)).float()[None, None]
    return torch.nn.functional.max_pool2d(m, cell)[0, 0].bool().numpy()


def true_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The true edit region on the latent grid: the cells at least ``CELL_THRESHOLD`` (20 %) covered by ``mask``,
    the rule by which the method itself turns a pixel mask into cells (``edit/masking.py``), so a user mask of the
    exact region scores IoU 1."""
    return (cell_fractions_from_pixels(np.asarray(mask, dtype=bool), grid) >= CELL_THRESHOLD).numpy()


def _iou(truth: np.ndarray, pred: np.ndarray) -> float:
    union = (truth | pred).sum()
    return float((truth & pred).sum() / union) if union else 1.0


def _judge_output(case: dict[str, Any], out, mode: str, seconds: float) -> dict[str, Any]:
    edited = np.asarray(out.image.convert("RGB"))
    recon = np.asarray(out.reconstruction.convert("RGB"))
    res = {"mode": mode, "prompt": case["prompt"], "edit_prompt": case["edit_prompt"],
           "target_word": case["target_word"] if mode == "auto" else None, "attribute": case["attribute"],
           "old_value": case["old_value"], "new_value": case["new_value"], "seconds": round(seconds, 3),
           **judge_edit(case, edited, recon)}
    if out.edit_mask is not None:
        pred = out.edit_mask.numpy().astype(bool)
        truth = true_cells(case["mask"], pred.shape)
        res["mask_iou"] = _iou(truth, pred)
        any_pixel = _cells(case["mask"], case["mask"].shape[0] // pred.shape[0])
        if any_pixel.shape == pred.shape:
            res["mask_iou_any_pixel"] = _iou(any_pixel, pred)
        res["mask_cells"] = int(pred.sum())
    return res


def _mode_inputs(case: dict[str, Any], mode: str, workdir: Path) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return {"target_word": case["target_word"]}
    if mode == "mask":
        path = Path(workdir) / "mask.png"
        Image.fromarray(np.asarray(case["mask"], dtype=np.uint8) * 255).save(path)
        return {"mask": str(path)}
    return {}


def run_edit_case(pipe, case: dict[str, Any], mode: str, settings, workdir: Path) -> dict[str, Any]:
    """Edit one case with ``pipe`` (an ``EditInfinityPipeline``) in ``mode`` and judge it."""
    kw = _mode_inputs(case, mode, workdir)
    t0 = time.perf_counter()
    out = pipe.edit(case["image"], case["prompt"], case["edit_prompt"], settings=settings, progress=False, **kw)
    return _judge_output(case, out, mode, time.perf_counter() - t0)


def summarise_edits(results: list[dict[str, Any]], mode: str, requested: int, truncated: bool) -> dict[str, Any]:
    """Rates, PSNR outside the dilated true region and mask IoU over judged cases (``results`` kept in the dict)."""
    ps = np.array([r["psnr_outside"] for r in results])
    summary = {"mode": mode, "cases": len(results), "requested": requested, "truncated": truncated,
               **_rates(results, ("present", "attribute_only", "matches")),
               "psnr_outside_mean": float(np.mean(ps)) if results else None,
               "psnr_outside_median": float(np.median(ps)) if results else None,
               "psnr_outside_ge_30_rate": float(np.mean(ps >= 30)) if results else None,
               "seconds_per_edit": float(np.mean([r["seconds"] for r in results])) if results else None}
    ious = np.array([r["mask_iou"] for r in results if "mask_iou" in r])
    if ious.size:
        summary.update(mask_iou_mean=float(ious.mean()), mask_iou_median=float(np.median(ious)),
                       mask_iou_ge_075_rate=float(np.mean(ious >= 0.75)))
    old = np.array([r["mask_iou_any_pixel"] for r in results if "mask_iou_any_pixel" in r])
    if old.size:
        summary["mask_iou_any_pixel_mean"] = float(old.mean())
    summary["results"] = results
    return summary


def edit_eval(pipe, n: int, mode: str, settings, *, base: int = EDIT_SEED_BASE,
              cases: Sequence[dict[str, Any]] | None = None, deadline: float | None = None,
              variants: dict[str, Any] | None = None,
              observe: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None,
              ) -> dict[str, Any] | dict[str, dict[str, Any]]:
    """Edit ``n`` held-out cases in ``mode`` and summarise: rates, mean PSNR outside the dilated mask.

    ``deadline`` (a ``time.perf_counter()`` value) stops before the next case once passed; the summary then says
    ``truncated`` and covers the cases done. ``variants`` (``{name: EditSettings}`` differing from ``settings``
    only in edit settings, e.g. the mask cleanup): every case is learned once with ``settings`` and edited with
    each variant from that learned state (the same pixels as one-shot edits); returns ``{name: summary}``.
    Each result records its case's ``case`` number (offset from the seed base) so shards can be merged.
    ``observe(case, output)`` (variants only), when given, sees every edit's ``EditOutput``; the dict it returns is
    added to that edit's result (e.g. a score of the edited picture).
    """
    cases = list(cases) if cases is not None else edit_cases(n, base)
    names = list(variants) if variants else [None]
    results: dict[Any, list] = {name: [] for name in names}
    truncated = False
    with scratch_dir("editinfinity-toy-eval") as tmp:
        for i, case in enumerate(cases):
            if deadline is not None and time.perf_counter() > deadline:
                truncated = True
                log.warning("edit %s: time is up after %d of %d cases", mode, i, len(cases))
                break
            if variants:
                kw = _mode_inputs(case, mode, Path(tmp))
                t0 = time.perf_counter()
                state = pipe.learn(case["image"], case["prompt"], settings=settings, progress=False)
                learn_s = time.perf_counter() - t0
                for name, vs in variants.items():
                    t0 = time.perf_counter()
                    out = pipe.edit(edit_prompt=case["edit_prompt"], settings=vs, learned=state, progress=False,
                                    **kw)
                    res = _judge_output(case, out, mode, learn_s + time.perf_counter() - t0)
                    results[name].append({**res, **observe(case, out)} if observe is not None else res)
            else:
                results[None].append(run_edit_case(pipe, case, mode, settings, Path(tmp)))
            for name in names:
                results[name][-1]["case"] = int(case.get("case", i))
            last = results[names[0]][-1]
            log.info("edit %s %d/%d: present=%s psnr_outside=%.1f", mode, i + 1, len(cases), last["present"],
                     last["psnr_outside"])
    summaries = {name: summarise_edits(results[name], mode, len(cases), truncated) for name in names}
    return summaries if variants else summaries[None]
