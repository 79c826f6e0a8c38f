"""The optimisation loop shared by prompt tuning and LoRA: the teacher-forced bitwise loss on one image.

"N iterations" means N optimizer updates (the reference performs N − 1, docs/method.md "Update counts"). Every random draw
(bitwise self-correction flips, condition dropout, DropPath, LoRA dropout) comes from generators seeded by the
stage's seed, so a stage re-run with the same inputs and seed gives the same result on the same device.

Speed: the update loop makes no host synchronisation of its own (losses stay on the device until the end), the
case's tensors are moved to the device once, and ``checkpointing`` / ``compile`` (``EditSettings``) are applied
for the duration of a stage by :func:`training_mode`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..models import schedules
from ..models.bundle import ModelBundle
from ..models.compile_cache import save_compile_cache
from ..models.quantizer import bitwise_self_correction
from ..models.text import TextFeatures
from .prepare import CaseData
from .settings import EditSettings, compile_enabled, parse_checkpointing

log = logging.getLogger(__name__)

#: Bytes one transformer block keeps for its backward pass, per token and per channel of width, when it is not
#: checkpointed (training objective under bf16 autocast, batch 1). Fitted to the 2B measurement at 1M on an H200
#: (peak 55.0 GiB with float32 weights: 8.2 GiB transformer + 4.6 GiB T5 + 4.0 GiB bf16 weight copies kept by
#: autograd + ~0.3 GiB VAE leave ~37.9 GiB for 32 blocks of 10521 tokens x 2048 channels = 59 bytes), rounded up.
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 64
#: The same when the blocks run through torch.compile: the fused elementwise chains keep fewer intermediates. From
#: the 2B at 1M on an H200 (bench/results/edit_h200.json): compiled, 12 blocks checkpointed peaked at 28.24 GiB and
#: none at 38.63 GiB, so a plain block keeps 43.2 bytes more than a checkpointed one (4): 47.2, rounded up.
COMPILED_ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 48
#: What a checkpointed block still keeps: its float32 input.
CHECKPOINTED_BYTES_PER_TOKEN_CHANNEL = 4
#: Peak GPU memory that ``checkpointing="auto"`` aims at (below the 40 GB goal in either unit).
AUTO_PEAK_BYTES = 36 * 2**30
#: Left free for the loss, gradients in flight, one recomputed block and allocator slack.
AUTO_RESERVE_BYTES = 2 * 2**30


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def checkpoint_block_count(setting: str | int, *, depth: int, tokens: int, width: int, batch: int = 1,
                           device: torch.device | str = "cpu", allocated_bytes: int | None = None,
                           free_bytes: int | None = None, peak_bytes: int = AUTO_PEAK_BYTES,
                           compiled: bool = False) -> int:
    """How many blocks (from the first) to checkpoint: ``"none"`` 0, ``"all"`` depth, an int as given (clamped),
    ``"auto"`` the fewest that keep the estimated training peak under ``peak_bytes``.

    Auto's estimate: each plain block keeps ``tokens * batch * width * ACTIVATION_BYTES_PER_TOKEN_CHANNEL`` bytes
    (``COMPILED_ACTIVATION_BYTES_PER_TOKEN_CHANNEL`` when ``compiled``: the blocks run through torch.compile),
    a checkpointed one ``... * CHECKPOINTED_BYTES_PER_TOKEN_CHANNEL``; on top of what is allocated now (weights,
    T5, VAE: ``torch.cuda.memory_allocated`` unless given) plus ``AUTO_RESERVE_BYTES``. The budget is also capped
    by the free device memory (``torch.cuda.mem_get_info``). On the CPU "auto" checkpoints nothing.
    """
    mode = parse_checkpointing(setting)
    if mode == "none":
        return 0
    if mode == "all":
        return depth
    if isinstance(mode, int):
        return max(0, min(mode, depth))
    device = torch.device(device)
    if device.type != "cuda" and allocated_bytes is None:
        return 0
    if allocated_bytes is None:
        allocated_bytes = torch.cuda.memory_allocated(device)
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    per_token_channel = COMPILED_ACTIVATION_BYTES_PER_TOKEN_CHANNEL if compiled else ACTIVATION_BYTES_PER_TOKEN_CHANNEL
    per_block = tokens * batch * width * per_token_channel
    per_checkpointed = tokens * batch * width * CHECKPOINTED_BYTES_PER_TOKEN_CHANNEL
    budget = peak_bytes - allocated_bytes - AUTO_RESERVE_BYTES
    if free_bytes is not None:
        budget = min(budget, free_bytes - AUTO_RESERVE_BYTES)
    # (depth - n) * per_block + n * per_checkpointed <= budget
    need = depth * per_block - budget
    if need <= 0:
        return 0
    return max(0, min(depth, math.ceil(need / (per_block - per_checkpointed))))


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def attention_backend(name: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context preferring one SDPA kernel on CUDA (``"auto"`` or the CPU: PyTorch's own choice, no change).

    The others stay enabled after it (flash, memory-efficient, math), so shapes it cannot take still run.
    """
    if name == "auto" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, _SDPA_BACKENDS[name])
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
                       if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: only the chosen kernel and the math fallback
        return sdpa_kernel([first, SDPBackend.MATH] if first != SDPBackend.MATH else [first])


def stage_checkpoint_blocks(models: ModelBundle, case: CaseData, settings: EditSettings, batch: int = 1) -> int:
    """:func:`checkpoint_block_count` for a training stage of ``case`` (the effective setting, low memory applied)."""
    t = models.transformer
    n = checkpoint_block_count(settings.effective_checkpointing, depth=len(t.blocks),
                               tokens=schedules.num_tokens(case.schedule), width=t.config.embed_dim, batch=batch,
                               device=models.device, compiled=compile_enabled(settings.compile, models.device.type))
    log.info("activation checkpointing: %d of %d blocks (setting %r)", n, len(t.blocks),
             settings.effective_checkpointing)
    return n


@contextlib.contextmanager
def training_mode(transformer: torch.nn.Module, settings: EditSettings, *, checkpoint_blocks: int = 0):
    """Train mode with the settings' condition dropout and DropPath rates, ``checkpoint_blocks`` blocks
    checkpointed, ``settings.compile`` (:func:`compile_enabled` on the model's device) and
    ``settings.attention_backend`` applied; restores eval mode (and no checkpointing/compile, the default attention
    kernels) afterwards, and writes what was newly compiled to the persistent compile cache."""
    previous = (transformer.cond_drop_rate, transformer.drop_path_rate)
    speed = hasattr(transformer, "set_activation_checkpointing")
    compiled = speed and compile_enabled(settings.compile, transformer.device.type)
    transformer.set_regularization(cond_drop_rate=settings.cond_drop_rate, drop_path_rate=settings.drop_path_rate)
    if speed:
        transformer.set_activation_checkpointing(checkpoint_blocks)
        transformer.set_block_compile(compiled)
    transformer.train()
    try:
        with attention_backend(getattr(settings, "attention_backend", "auto"), transformer.device):
            yield
    finally:
        transformer.eval()
        transformer.set_regularization(cond_drop_rate=previous[0], drop_path_rate=previous[1])
        if speed:
            transformer.set_activation_checkpointing(0)
            transformer.set_block_compile(False)
        if compiled:
            save_compile_cache()


def on_device(case: CaseData, device: torch.device, variants: Iterable[str] = ()) -> CaseData:
    """A shallow copy of ``case`` whose raw features (and the named text variants) already live on ``device``,
    so the per-update ``.to(device)`` calls are no-ops instead of host copies."""
    text = dict(case.text)
    for name in variants:
        text[name] = text[name].to(device)
    return dataclasses.replace(case, raw_features=case.raw_features.to(device), text=text)


def teacher_forcing_inputs(models: ModelBundle, case: CaseData, settings: EditSettings, generator: torch.Generator,
                           batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit labels and (self-corrected) next-scale inputs for ``batch`` independently noised copies of the image."""
    z = case.raw_features.to(models.device).expand(batch, -1, -1, -1).contiguous()
    layers = len(case.schedule) if settings.noise_layers is None else settings.noise_layers
    return bitwise_self_correction(z, case.schedule, layers, settings.noise_strength, generator)


def learning_rate(settings: EditSettings, models=None) -> float:
    """``settings.lr``, or when unset the learning rate of the models' preset (``Preset.edit_lr``)."""
    if settings.lr is not None:
        return float(settings.lr)
    from ..models.presets import PRESETS, Preset

    preset = PRESETS.get(getattr(models, "preset", None) or "")
    return float(preset.edit_lr if preset is not None else Preset.edit_lr)


def optimize(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor], iters: int,
             settings: EditSettings, desc: str, progress: bool = True, lr: float | None = None) -> list[float]:
    """AdamW (decoupled weight decay, constant lr) with global-norm clipping of the trained tensors only.

    ``lr``: the learning rate (default :func:`learning_rate` of ``settings`` alone).

    Losses stay on the device and are read once at the end (per-step debug logging reads them every step).
    """
    params = list(params)
    if iters == 0:
        return []
    fused = all(p.is_cuda for p in params)
    lr = lr if lr is not None else learning_rate(settings)
    opt = torch.optim.AdamW(params, lr=lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay, fused=fused or None)
    debug = log.isEnabledFor(logging.DEBUG)
    losses: list[torch.Tensor] = []
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
        losses.append(loss.detach().to(torch.float64))
        if debug:
            log.debug("%s step %d loss %.6f", desc, step, float(losses[-1]))
    return [float(v) for v in torch.stack(losses).cpu().tolist()]


def styled_text(case: CaseData, variant: str, rows: torch.Tensor | None, device: torch.device) -> TextFeatures:
    """A styled prompt's features with the learned rows appended (after every sample's EOS row)."""
    text = case.text[variant].to(device)
    return text.append_rows(rows.to(device)) if rows is not None else text
