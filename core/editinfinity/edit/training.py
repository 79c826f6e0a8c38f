"""The optimisation loop shared by prompt tuning and LoRA: the teacher-forced bitwise loss on one image.

"N iterations" means N optimizer updates (the reference performs N − 1, METHOD.md Q10). Every random draw
(bitwise self-correction flips, condition dropout, DropPath, LoRA dropout) comes from generators seeded by the
stage's seed, so a stage re-run with the same inputs and seed gives the same result on the same device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..models.bundle import ModelBundle
from ..models.quantizer import bitwise_self_correction
from ..models.text import TextFeatures
from .prepare import CaseData
from .settings import EditSettings

log = logging.getLogger(__name__)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


@contextlib.contextmanager
def training_mode(transformer: torch.nn.Module, settings: EditSettings):
    """Train mode with the settings' condition dropout and DropPath rates; restores eval mode afterwards."""
    previous = (transformer.cond_drop_rate, transformer.drop_path_rate)
    transformer.set_regularization(cond_drop_rate=settings.cond_drop_rate, drop_path_rate=settings.drop_path_rate)
    transformer.train()
    try:
        yield
    finally:
        transformer.eval()
        transformer.set_regularization(cond_drop_rate=previous[0], drop_path_rate=previous[1])


def teacher_forcing_inputs(models: ModelBundle, case: CaseData, settings: EditSettings, generator: torch.Generator,
                           batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit labels and (self-corrected) next-scale inputs for ``batch`` independently noised copies of the image."""
    z = case.raw_features.to(models.device).expand(batch, -1, -1, -1).contiguous()
    layers = len(case.schedule) if settings.noise_layers is None else settings.noise_layers
    return bitwise_self_correction(z, case.schedule, layers, settings.noise_strength, generator)


def optimize(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor], iters: int,
             settings: EditSettings, desc: str, progress: bool = True) -> list[float]:
    """AdamW (decoupled weight decay, constant lr) with global-norm clipping of the trained tensors only."""
    params = list(params)
    if iters == 0:
        return []
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay, fused=fused or None)
    losses = []
    for step in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        if loss.requires_grad:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        else:
            # Condition dropout replaced the whole text (learned rows included) by the unconditional rows: the
            # loss does not depend on the prompt rows this step (the reference's zero gradient); Adam skips them.
            log.debug("%s step %d: condition dropped, no gradient", desc, step)
        opt.step()
        losses.append(float(loss.detach()))
        log.debug("%s step %d loss %.6f", desc, step, losses[-1])
    return losses


def styled_text(case: CaseData, variant: str, rows: torch.Tensor | None, device: torch.device) -> TextFeatures:
    """A styled prompt's features with the learned rows appended (after every sample's EOS row)."""
    text = case.text[variant].to(device)
    return text.append_rows(rows.to(device)) if rows is not None else text
