"""Training the BSQ VAE on toy-world pictures.

Objective (no pretrained perceptual network: nothing can be downloaded): the decoder reconstructs the picture from
the *multi-scale quantised* latent — ``multiscale_quantize`` over the schedule the transformer uses, so the
decoder learns exactly the input it gets at inference — with an L1 + MSE loss; gradients reach the encoder
through the quantiser's straight-through estimator (``bsq_quantize`` adds ``u - u.detach()`` to its codes, where
``u`` is the l2-normalised residual). A commitment term ``mean((z - sg(q))^2)`` ties the raw latent's scale to
the summed codes ``q`` (the normalisation inside BSQ makes the reconstruction loss blind to it). Each step
renders fresh random scenes (seeded per step) with mild pixel noise.

Precision: encoder and decoder under bf16 autocast on GPU; the quantiser always runs in float32 (bits are signs).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import toyworld
from ..edit.pixels import to_bytes
from ..errors import CheckpointError
from ..metrics import psnr
from ..models import schedules
from ..models.bsq_vae import BSQVAE
from ..models.quantizer import multiscale_quantize
from . import common
from .data import VAE_STREAM, SceneStream, heldout_scenes, render_batch

log = logging.getLogger(__name__)


@dataclass
class VAEConfig:
    """Settings of a VAE training run (defaults: the toy preset's VAE, a few minutes on one GPU)."""

    # base_ch 64: GroupNorm(32) then normalises pairs of channels at full resolution. With one channel per group
    # (base_ch 32) a flat region's absolute colour is normalised away and the net barely learns the background.
    model: dict = field(default_factory=lambda: {"base_ch": 64, "ch_mult": [1, 1, 2, 2, 2], "num_res_blocks": 1,
                                                 "codebook_dim": 32, "patch_size": 16})
    image_size: int = 256
    resolution: str | list = "0.06M"  # the schedule the latent is quantised with (the transformer's), or grids
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    commit_weight: float = 0.25
    noise_max: float = 3.0  # pixel noise std of each training picture ~ U(0, noise_max), 0-255 units
    steps: int = 0  # 0: only the time budget limits the run
    minutes: float = 3.0  # 0: only the step count limits the run (2.5 min on an H200: 32 dB held out)
    seed: int = 0
    workers: int = 8  # scene-sampling processes (0: sample in the training process)
    checkpoint_minutes: float = 1.0
    log_seconds: float = 15.0
    eval_images: int = 200
    # Start from a trained VAE (save_pretrained layout) instead of a random initialisation; ``model`` is then
    # taken from that VAE's config.
    init_from: str | None = None
    # False: fine-tune the decoder only. The encoder is frozen and run in float32 as at inference, so every
    # picture's bit codes stay exactly those of ``init_from`` and a transformer trained on them stays valid.
    train_encoder: bool = True

    def validate(self) -> None:
        if not self.train_encoder and not self.init_from:
            raise ValueError("train_encoder: false (decoder-only fine-tuning) needs init_from: a trained VAE")
        if self.model.get("codebook_dim", 32) <= 0 or self.batch_size < 1:
            raise ValueError("codebook_dim and batch_size must be positive")
        sched = self.schedule()
        patch = int(self.model.get("patch_size", 16))
        if schedules.last_grid(sched) != (self.image_size // patch, self.image_size // patch):
            raise ValueError(f"resolution {self.resolution} ends at grid {schedules.last_grid(sched)}, which does not "
                             f"match {self.image_size}px pictures with patch size {patch}")

    def schedule(self) -> schedules.Schedule:
        return common.schedule_of(self.resolution)


@dataclass
class VAETrainResult:
    """What a run produced: the model directory (``save_pretrained``), the counters and the held-out PSNR."""

    model_dir: Path
    steps: int
    seconds: float
    final_losses: dict[str, float]
    heldout: dict[str, Any] | None
    history: list[dict[str, float]]


def vae_losses(vae: BSQVAE, img: torch.Tensor, schedule, config: VAEConfig) -> dict[str, torch.Tensor]:
    """The training objective on one batch (``img`` in [-1, 1]); ``"loss"`` is the weighted sum.

    With ``config.train_encoder`` false the encoder runs without gradients in float32 (``vae.encode_raw``, as the
    edit pipeline encodes), so the decoder learns from exactly the codes it will be given."""
    if config.train_encoder:
        with common.autocast(img.device):
            z = vae.encoder(img)
        z = z.float()
    else:
        with torch.no_grad():
            z = vae.encode_raw(img).float()
    codes = multiscale_quantize(z, schedule)  # float32, straight-through gradients to z
    with common.autocast(img.device):
        recon = vae.decoder(codes.summed_codes)
    recon = recon.float()
    err = recon - img
    l1 = err.abs().mean()
    mse = err.pow(2).mean()
    commit = (z - codes.summed_codes.detach()).pow(2).mean()
    loss = config.l1_weight * l1 + config.mse_weight * mse + config.commit_weight * commit
    with torch.no_grad():
        mse_clamped = (recon.detach().clamp(-1, 1) - img).pow(2).mean()
        batch_psnr = 10 * torch.log10(4.0 / mse_clamped.clamp_min(1e-12))  # range 2 in [-1, 1] units
    return {"loss": loss, "l1": l1, "mse": mse, "commit": commit, "psnr": batch_psnr}


@torch.no_grad()
def reconstruct(vae: BSQVAE, img: torch.Tensor, schedule) -> torch.Tensor:
    """Decode of the multi-scale quantised latent, as the edit pipeline does it (float32 encoder, clamped)."""
    return vae.decode(multiscale_quantize(vae.encode_raw(img), schedule).summed_codes)


@torch.no_grad()
def heldout_psnr(vae: BSQVAE, scenes: list[toyworld.Scene], schedule, device: torch.device | str,
                 batch: int = 16) -> dict[str, Any]:
    """Reconstruction PSNR (dB, uint8 pictures, per picture then averaged) on clean renders of ``scenes``."""
    was_training = vae.training
    vae.eval()
    values: list[float] = []
    try:
        for i in range(0, len(scenes), batch):
            chunk = scenes[i:i + batch]
            img = render_batch(chunk, device)
            rec = to_bytes(reconstruct(vae, img, schedule))
            src = to_bytes(img)
            values += [psnr(s, r) for s, r in zip(src, rec, strict=True)]
    finally:
        vae.train(was_training)
    finite = [v for v in values if math.isfinite(v)]
    arr = np.array(finite if finite else [float("inf")])
    return {"images": len(values), "mean_psnr": float(arr.mean()), "median_psnr": float(np.median(arr)),
            "min_psnr": float(arr.min()), "fraction_ge_30db": float(np.mean([v >= 30 for v in values]))}


def build_vae(config: VAEConfig) -> BSQVAE:
    """A freshly initialised VAE of the config (seeded by ``config.seed``), or ``config.init_from``'s weights."""
    if config.init_from:
        src = Path(config.init_from)
        if not (src / "config.json").is_file():
            raise CheckpointError(f"init_from {src}: no VAE there (expected config.json and safetensors weights "
                                  "as written by save_pretrained, e.g. presets/toy/vae)")
        vae = BSQVAE.from_pretrained(str(src)).float()
        ours = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()}
        theirs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items() if k in ours}
        if theirs != ours:
            log.info("vae: model settings taken from %s: %s", src, theirs)
            config.model = {**config.model, **theirs}
        return vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return BSQVAE(**{**config.model, "ch_mult": tuple(config.model["ch_mult"])})


def train_vae(config: VAEConfig, run_dir: str | Path, *, device: str | torch.device | None = None,
              resume: bool = False, extend: bool = False, progress: bool = False,
              stop_at: int | None = None) -> VAETrainResult:
    """Train (or resume) a VAE in ``run_dir``: ``checkpoint/`` every ``checkpoint_minutes``, ``log.jsonl``,
    and once the budget is spent the model in ``vae/`` (``save_pretrained``, float32) and ``result.json``.

    ``stop_at`` ends this call after that step without finishing the run (to test resumption); the learning-rate
    schedule still spans the configured budget. ``extend`` (with ``resume``) continues a *finished* run for another
    budget of ``steps``/``minutes``, with a fresh warm-up and cosine cycle.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = common.resolve_device(device)
    common.configure_backends(dev)
    schedule = config.schedule()
    cfg_dict = common.config_dict(config)
    vae = build_vae(config).to(dev).train()
    if not config.train_encoder:
        vae.encoder.requires_grad_(False)
        vae.encoder.eval()
    trained = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    opt = common.adamw(common.decay_groups(trained), config.lr, config.betas, config.weight_decay, dev)
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    state = common.TrainState()
    ckpt = common.find_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise CheckpointError(f"{run_dir} already holds a training checkpoint; pass --resume to continue it "
                              "or choose another output directory")
    if ckpt is not None:
        state = common.load_checkpoint(ckpt, {"model": vae}, opt, {"noise": gen})
        log.info("vae: resumed %s at step %d (%.0f s trained)", ckpt, state.step, state.elapsed)
        if extend and state.finished:
            state.extend()
            log.info("vae: extending the finished run by %s", common.budget_text(config))
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("vae: %.2fM parameters, batch %d, %dpx, schedule %s, device %s", n_params / 1e6, config.batch_size,
             config.image_size, [s[1] for s in schedule], dev)

    def save() -> None:
        common.save_checkpoint(run_dir, {"model": vae}, opt, state, {"noise": gen}, cfg_dict)

    with SceneStream(config.seed, VAE_STREAM, config.batch_size, start=state.step, width=config.image_size,
                     height=config.image_size, workers=config.workers) as stream:

        def step_fn(step: int) -> dict[str, torch.Tensor]:
            scenes = stream.get(step)
            noise = torch.rand(len(scenes), generator=gen, device=dev) * config.noise_max
            img = render_batch(scenes, dev, noise=noise, generator=gen)
            losses = vae_losses(vae, img, schedule, config)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            losses["grad_norm"] = torch.nn.utils.clip_grad_norm_([p for _, p in trained], config.grad_clip)
            opt.step()
            return losses

        last = common.run_steps(
            "vae", run_dir, state, common.Budget(steps=config.steps, minutes=config.minutes),
            step_fn=step_fn, optimizer=opt, save=save, device=dev, samples_per_step=config.batch_size,
            lr_fn=lambda step, total: common.lr_at(step, config.lr, config.warmup_steps, total, config.min_lr_ratio),
            log_seconds=config.log_seconds, checkpoint_minutes=config.checkpoint_minutes, progress=progress,
            stop_at=stop_at)
    model_dir = run_dir / "vae"
    heldout = None
    if state.finished:
        vae.eval()
        common.save_dir(model_dir, vae.save_pretrained)
        if config.eval_images > 0:
            scenes = heldout_scenes(config.eval_images, config.image_size, config.image_size)
            heldout = heldout_psnr(vae, scenes, schedule, dev)
            log.info("vae: held-out PSNR %.2f dB (median %.2f, min %.2f, %.0f%% >= 30 dB) on %d pictures",
                     heldout["mean_psnr"], heldout["median_psnr"], heldout["min_psnr"],
                     100 * heldout["fraction_ge_30db"], heldout["images"])
        result = {"steps": state.step, "seconds": round(state.elapsed, 2), "final": last, "heldout": heldout,
                  "config": cfg_dict, "hardware": common.hardware(), "parameters": n_params}
        (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return VAETrainResult(model_dir=model_dir, steps=state.step, seconds=state.elapsed, final_losses=last,
                          heldout=heldout, history=state.history)
