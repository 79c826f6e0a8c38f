"""Stage E, mask: the edit mask on the last scale's grid and the smoothing (keep) weights.

Mode "auto" thresholds the attention map; mode "mask" uses the user's mask prepared in stage A. Both feed the
piecewise-linear kernel directly on the latent grid — no PNG round trip (docs/method.md, section 5).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InvalidCaseError, StageError
from ..models.presets import effective_mask_threshold
from ..report import mask_picture, weights_picture
from .artifacts import read_stage, read_tensors, stage_output
from .attention import load_attention
from .mask import (
    AUTO_BAND,
    band_for_grid,
    candidate_bands,
    clean_mask,
    threshold_attention,
    weights_from_edit_mask,
    weights_from_pixel_mask,
)
from .prepare import CaseData, load_case, require_mode
from .settings import EditSettings

WEIGHTS_FILE = "weights.safetensors"
#: A latent cell belongs to the edit when at least this fraction of its pixels does (docs/method.md, section 6).
CELL_THRESHOLD = 0.2


def edit_weights(case: CaseData, attention: torch.Tensor | None, threshold: float | None = None,
                 band: str = "scaled", core: float = 0.0, *, fill_holes: bool = False,
                 min_region: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(edit_mask bool (hK,wK), keep weights W float32 (hK,wK)); W = 1 keeps the source code. ``threshold``: the
    automatic mask's cut (None: the case's preset's, ``Preset.mask_threshold``); ``band``: the smoothing band's
    width (:func:`~editinfinity.edit.mask.band_for_grid`; for ``"auto"`` the weights of its first candidate, the
    generate stage tries the others: :func:`band_weights`); ``core``: the automatic mask's hysteresis level
    (:func:`~editinfinity.edit.mask.threshold_attention`); ``fill_holes`` / ``min_region``: its cleanup
    (:func:`~editinfinity.edit.mask.clean_mask`; user masks are used as given)."""
    require_mode(case, "auto", "mask", stage="mask")
    if case.spec.mode == "auto":
        if attention is None:
            raise StageError("mode auto needs the attention stage's output (--attention DIR)")
        cut = effective_mask_threshold(threshold, case.preset)
        edit = clean_mask(threshold_attention(attention, cut, core), holes=fill_holes, min_region=min_region)
    else:
        edit = case.user_cells >= CELL_THRESHOLD
    weights = next(iter(band_weights(case, edit, band).values()))
    return edit.bool(), weights


def band_weights(case: CaseData, edit_mask: torch.Tensor, band: str) -> dict[str, torch.Tensor]:
    """Keep weights W float32 (hK,wK) for each band ``band`` stands for (:func:`~editinfinity.edit.mask.
    candidate_bands`): from the edit mask on the grid (mode auto) or from the user's pixel mask (mode mask)."""
    require_mode(case, "auto", "mask", stage="mask")
    out = {}
    for name in candidate_bands(case.grid, band):
        kernel = band_for_grid(case.grid, name)
        if case.spec.mode == "auto":
            w = torch.as_tensor(weights_from_edit_mask(edit_mask.bool(), **kernel))
        else:
            w = weights_from_pixel_mask(case.user_pixels, case.grid, **kernel)
        out[name] = w.float()
    return out


def band_record(grid, band: str) -> dict:
    """What a stage record says of the band: its distances, or for ``"auto"`` each candidate's."""
    if band == AUTO_BAND:
        return {"candidates": {name: band_for_grid(grid, name) for name in candidate_bands(grid, band)}}
    return band_for_grid(grid, band)


def load_band_weights(mask_dir, case: CaseData) -> dict[str, torch.Tensor]:
    """The keep weights the generate stage blends with: ``{band: W}`` of the mask stage, or for ``band="auto"``
    one entry per candidate band (:func:`band_weights`), rebuilt from the mask stage's edit mask."""
    record = read_stage(mask_dir, "mask", run_id=case.run_id, needed_by="the generate stage")
    edit, weights = load_weights(mask_dir, run_id=case.run_id)
    band = record.get("settings", {}).get("band") or ""
    return band_weights(case, edit, band) if band == AUTO_BAND else {band: weights}


def used_weights_dir(mask_dir, generate_dir, generate_record: dict) -> Path:
    """The stage folder holding the keep weights an edit blended with (``WEIGHTS_FILE``, ``weights.png``): the
    generate stage's when it kept one band of several (``band="auto"``, its record says which), else the mask
    stage's."""
    return Path(generate_dir if generate_record.get("band") else mask_dir)


def load_weights(mask_dir, run_id: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    read_stage(mask_dir, "mask", run_id=run_id, needed_by="the generate stage")
    path = Path(mask_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise StageError(f"{path} is missing; re-run the mask stage")
    t = read_tensors(path, "mask")
    return t["edit_mask"].bool(), t["weights"]


def make_mask(case_dir, out_dir, *, attention_dir=None, threshold: float | None = None, band: str | None = None,
              core: float = 0.0, fill_holes: bool = False, min_region: float = 0.0,
              overwrite: bool = False) -> Path:
    """Stage E over files: writes ``weights.safetensors``, ``mask.png`` and ``weights.png``. ``threshold`` None:
    the case's preset's; ``stage.json`` records the threshold used and whether it was given or the preset's.
    ``band`` None: the default of :class:`EditSettings` (the staged KFP component passes none)."""
    band = band if band is not None else EditSettings().band
    for name, value in (("--threshold", threshold), ("--core-threshold", core)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InvalidCaseError(f"{name} must be in [0, 1] (a level between the map's min and max), got {value}")
    if not 0.0 <= min_region < 1.0:
        raise InvalidCaseError(f"--min-region must be a fraction of the grid in [0, 1), got {min_region}")
    case = load_case(case_dir)
    started = time.perf_counter()  # after loading: the stage's own work
    amap = load_attention(attention_dir, run_id=case.run_id) if case.spec.mode == "auto" else None
    cut = effective_mask_threshold(threshold, case.preset)
    edit, weights = edit_weights(case, amap, cut, band, core, fill_holes=fill_holes, min_region=min_region)
    size = (case.image.width, case.image.height)
    with stage_output(out_dir, "mask", run_id=case.run_id, overwrite=overwrite, started=started,
                      settings={"threshold": cut, "threshold_source": "given" if threshold is not None else "preset",
                                "core": core, "band": band,
                                "fill_holes": fill_holes, "min_region": min_region,
                                **band_record(case.grid, band)}
                      ) as (tmp, record):
        save_file({"edit_mask": edit.to(torch.uint8).contiguous(), "weights": weights.contiguous()},
                  str(tmp / WEIGHTS_FILE))
        mask_picture(edit.numpy(), size).save(tmp / "mask.png")
        weights_picture(weights.numpy(), size).save(tmp / "weights.png")
        record["edit_fraction"] = float(edit.float().mean())
    return Path(out_dir)
