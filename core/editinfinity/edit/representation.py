"""Can the preset represent this picture? The source's reconstruction (decode of its own codes) against the source.

Editing keeps or regenerates the source's *codes*; a picture the VAE cannot reconstruct comes back as the VAE's
approximation of it everywhere (the bundled toy preset, trained on flat-coloured shapes, turns a photograph into
coloured blobs). The reconstruction is decoded by every edit anyway (``reconstruction.png``), so measuring it is
free: PSNR (dB) and SSIM of the reconstruction against the preprocessed source. Below either of the preset's
calibrated floors (``Preset.min_reconstruction_psnr_db`` / ``min_reconstruction_ssim``, measured by
``bench/representation.py``, numbers in ``bench/results/representation_toy_cpu.json``) the CLI (a logged warning),
``summary.json`` (``representation``) and the report say that the preset cannot represent this image and what to do
instead. PSNR alone does not separate them: a smooth photograph can reach the PSNR of a toy scene while its textures
come back as blobs; SSIM, which compares local structure, does.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image

from ..metrics import psnr, ssim
from ..models.bundle import ModelBundle

log = logging.getLogger(__name__)

ADVICE = ("convert the official Infinity-2B weights (`editinfinity convert --transformer infinity_2b_reg.pth --vae "
          "infinity_vae_d32reg.pth --text-encoder google/flan-t5-xl --out weights/2b`) and edit with "
          "`--preset 2b --weights weights/2b`")


def reconstruction_quality(source: Image.Image, reconstruction: Image.Image) -> dict:
    """``{"psnr_db", "ssim"}`` of the reconstruction against the source (same size, RGB)."""
    value = psnr(source.convert("RGB"), reconstruction.convert("RGB"))
    return {"psnr_db": round(float(value), 3) if value != float("inf") else None,
            "ssim": round(float(ssim(source.convert("RGB"), reconstruction.convert("RGB"))), 5)}


def representation_check(source: Image.Image, reconstruction: Image.Image, preset: str) -> dict:
    """Reconstruction quality, the preset's floors and, below either, a one-line warning naming what to do.

    Returns ``{"reconstruction_psnr_db", "reconstruction_ssim", "min_psnr_db", "min_ssim", "representable",
    "warning"}``; the floors and ``representable`` are None for presets without a calibrated floor (random or
    official weights), ``warning`` None when there is nothing to say.
    """
    from ..models.presets import PRESETS

    quality = reconstruction_quality(source, reconstruction)
    spec = PRESETS.get(preset)
    floor_db = getattr(spec, "min_reconstruction_psnr_db", None)
    floor_ssim = getattr(spec, "min_reconstruction_ssim", None)
    value, sim = quality["psnr_db"], quality["ssim"]
    low_db = floor_db is not None and value is not None and value < floor_db
    low_ssim = floor_ssim is not None and sim < floor_ssim
    representable = None if floor_db is None and floor_ssim is None else not (low_db or low_ssim)
    warning = None
    if not representable and representable is not None:
        shown = f"{value:.1f} dB PSNR" if value is not None else "identical"
        floors = " and ".join(f for f in (f"{floor_db:.1f} dB" if floor_db is not None else "",
                                          f"SSIM {floor_ssim:.2f}" if floor_ssim is not None else "") if f)
        warning = (f"the {preset} preset cannot represent this image: its reconstruction reaches {shown}, SSIM "
                   f"{sim:.2f} (its own kind of picture: at least {floors}), so the edit will not look like the "
                   f"source; {ADVICE}")
    return {"reconstruction_psnr_db": value, "reconstruction_ssim": sim, "min_psnr_db": floor_db,
            "min_ssim": floor_ssim, "representable": representable, "warning": warning}


@torch.no_grad()
def reconstruct_image(models: ModelBundle, image: Image.Image, resolution: str) -> tuple[Image.Image, Image.Image]:
    """(the preprocessed source, the decode of its exact codes): what an edit of ``image`` keeps where W = 1."""
    from .generate import to_pil
    from .prepare import encode_image

    schedule, pre, _, codes = encode_image(models, image.convert("RGB"), resolution)
    with models.autocast():
        img = models.vae.decode_bits([b.to(models.device) for b in codes.bits], schedule)
    return pre, to_pil(img)
