"""How well the model itself finds that a picture fits a prompt, used to choose the smoothing band per edit.

The score of a picture under a prompt is the base transformer's teacher-forced bit cross-entropy of the picture's
exact multi-scale codes (clean inputs, every token weighted alike, no LoRA and no learned rows). An edit that did
what the edit prompt asks scores lower under the edit prompt than under the source prompt; an edit that redrew the
source, or drew something neither prompt asks for, does not. ``band="auto"`` generates the edit once per candidate
band (``edit.mask.candidate_bands``) with the same sampling noise and keeps the one with the lowest *contrast*
(edit-prompt minus source-prompt cross-entropy). Measured on the toy model in ``bench/toy_band_rerank.py``
(docs/method.md, the smoothing band).
"""

from __future__ import annotations

import contextlib

import torch
from PIL import Image

from ..errors import StageError
from ..models.bundle import ModelBundle
from ..models.quantizer import bitwise_self_correction
from .images import image_to_tensor
from .prepare import CaseData

#: The plain (unstyled) prompts a picture is scored under.
SCORED_PROMPTS = ("edit_plain", "source_plain")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@torch.no_grad()
def prompt_cross_entropy(models: ModelBundle, case: CaseData, picture: Image.Image) -> dict[str, float]:
    """Mean bit cross-entropy of ``picture`` (at the case's size) under each of :data:`SCORED_PROMPTS`."""
    missing = [name for name in SCORED_PROMPTS if name not in case.text]
    if missing:
        raise StageError(f"the case has no {', '.join(missing)} prompt features (prepared by an older version); "
                         "re-run prepare to choose the band automatically")
    if (picture.height, picture.width) != (case.image.height, case.image.width):
        raise ValueError(f"picture is {picture.width}x{picture.height}, the case's image "
                         f"{case.image.width}x{case.image.height}")
    pixels = image_to_tensor(picture.convert("RGB")).to(models.device)
    z = models.vae.encode_raw(pixels).float()  # as prepare encodes the source
    gt_bits, x_in = bitwise_self_correction(z, case.schedule, 0, 0.0)
    scores = {}
    with _eval_mode(models.transformer):
        for name in SCORED_PROMPTS:
            with models.autocast():
                logits = models.transformer(case.text[name].to(models.device), x_in, case.schedule)
            scores[name] = float(models.transformer.bit_loss(logits.float(), gt_bits, case.schedule, reweight=False))
    return scores


def edit_contrast(scores: dict[str, float]) -> float:
    """Edit-prompt minus source-prompt cross-entropy: lower = the picture moved further towards the edit prompt."""
    return scores["edit_plain"] - scores["source_plain"]
