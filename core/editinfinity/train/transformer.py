"""Training the Infinity transformer (and its small T5 text encoder) on toy-world captions.

Each step renders a batch of fresh scenes (seeded per step), encodes them with the frozen VAE, and builds the
teacher-forcing inputs with bitwise self-correction (``quantizer.bitwise_self_correction``: per scale a flip
probability ~ U{0, .01, ..., strength}; labels are the clean bits of the residual the flipped earlier scales
leave). The loss is ``Infinity.bit_loss`` (per-bit cross-entropy, scale-reweighted). Classifier-free guidance
learns from the model's own condition dropout (``cond_drop_rate``: a dropped sample's text rows become
``cfg_uncond[:len]``).

Text: the captions' T5 rows, trained jointly with the transformer by default (a frozen random T5 barely tells
"a red circle and a blue square" from "a blue circle and a red square"). Part of the batch uses the styled prompt
(``caption + STYLE_SUFFIX``) and part of those get 20 appended rows — zeros or small random vectors — because
the edit stages append learned rows (zero-initialised) after the styled prompt.

Optionally (``attn_loss_weight`` > 0) the loss adds the auxiliary cross-attention loss of
:mod:`editinfinity.train.attention_loss`: each object's colour and shape words attend to that object's cells.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import toyworld
from ..errors import CheckpointError
from ..models import schedules
from ..models.bsq_vae import BSQVAE
from ..models.infinity import Infinity
from ..models.quantizer import bitwise_self_correction
from ..models.text import STYLE_SUFFIX, TextFeatures, tokenize_prompts
from . import common
from .attention_loss import CrossAttentionTargets, object_coverage, word_token_weights
from .data import TEXT_STREAM, TRANSFORMER_STREAM, SceneStream, render_batch, stream_rng

log = logging.getLogger(__name__)

#: Parameters that never get weight decay (tables, gains, per-head temperatures, learned queries).
NO_DECAY = ("cfg_uncond", "lvl_embed", "pos_start", "ada_gss", "scale_mul", "text_proj_for_sos.ca.mat_q",
            "embed_tokens", "shared.weight", "relative_attention_bias")


@dataclass
class TransformerConfig:
    """Settings of a transformer training run (defaults: the toy preset, a few minutes on one GPU)."""

    model: dict = field(default_factory=lambda: {"depth": 8, "embed_dim": 256, "num_heads": 4, "mlp_ratio": 4,
                                                 "text_channels": 128, "text_maxlen": 512, "codebook_dim": 32})
    text_encoder: dict = field(default_factory=lambda: {"d_model": 128, "num_layers": 2, "num_heads": 4})
    train_text_encoder: bool = True
    text_lr_scale: float = 1.0
    image_size: int = 256
    resolution: str | list = "0.06M"  # pixel budget name, or explicit [h, w] grids (small test runs)
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.97)
    weight_decay: float = 0.05
    warmup_steps: int = 300
    min_lr_ratio: float = 0.05
    grad_clip: float = 2.0
    noise_strength: float = 0.3  # bitwise self-correction
    noise_layers: int = 0  # scales whose bits are flipped; 0: every scale
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    style_prob: float = 0.5  # share of captions with the language-style suffix
    rows_prob: float = 0.5  # share of styled captions that get `rows` appended rows
    rows: int = 20
    rows_zero_prob: float = 0.5  # appended rows are zeros, else gaussian with std 10**U(rows_log10_std)
    rows_log10_std: tuple[float, float] = (-5.0, -2.5)
    image_noise: float = 0.0  # pixel noise std of the training pictures (0-255 units)
    # Share of two-shape training scenes; None: the world's own 1-or-2 with equal odds. Raising it spends more of
    # the training on the harder two-object layouts (evaluation still draws from the world's distribution).
    two_shape_prob: float | None = None
    # Weight of the auxiliary cross-attention loss (train/attention_loss.py: each object's colour and shape words
    # should attend to that object's cells, the map the automatic mask thresholds); 0: off, the plain bit loss.
    attn_loss_weight: float = 0.0
    # Latent replay: a FIFO buffer of `replay_size` encoded pictures, of which `replay_refresh` are replaced by new
    # ones every step; a batch samples the buffer. Each picture is used ~batch_size/replay_refresh times (with new
    # bit flips and prompt variants), and the VAE encodes replay_refresh pictures per step instead of batch_size.
    # replay_size 0: every step renders and encodes a fresh batch.
    replay_size: int = 16384
    replay_refresh: int = 32
    steps: int = 0
    minutes: float = 7.0
    # Start from trained weights (a directory in the load_models layout: transformer/, text_encoder/) instead of
    # a random initialisation; the model config must match. Only for a new run (a resumed run has its checkpoint).
    init_from: str | None = None
    compile_blocks: bool = False  # torch.compile the teacher-forced blocks (the first step then compiles)
    seed: int = 0
    workers: int = 12  # scene sampling: ~1.5 ms per scene, 128 scenes per step
    checkpoint_minutes: float = 1.0
    log_seconds: float = 15.0
    sample_images: int = 64  # held-out text-to-image check at the end (0: skip)
    cfg: float = 4.0  # guidance of that check (the edit pipeline's default)
    tau: float = 0.5
    extra_cfgs: tuple[float, ...] = (2.0,)  # also checked, to see which guidance suits the trained model

    def validate(self) -> None:
        if not 0 <= self.noise_strength <= 1:
            raise ValueError("noise_strength must be in [0, 1]")
        if self.two_shape_prob is not None and not 0 <= self.two_shape_prob <= 1:
            raise ValueError("two_shape_prob must be in [0, 1] (or null for the world's own distribution)")
        if self.attn_loss_weight < 0:
            raise ValueError("attn_loss_weight must be >= 0 (0 turns the attention loss off)")
        if self.batch_size < 1 or self.rows < 0:
            raise ValueError("batch_size must be positive and rows non-negative")
        if self.replay_size and (self.replay_refresh < 1 or self.replay_size % self.replay_refresh
                                 or self.replay_size < self.batch_size):
            raise ValueError("replay_size must be a multiple of replay_refresh and at least batch_size")
        sched = self.schedule()
        if schedules.pixel_size(sched) != (self.image_size, self.image_size):
            raise ValueError(f"resolution {self.resolution} is {schedules.pixel_size(sched)} px, "
                             f"not {self.image_size} px")

    def schedule(self) -> schedules.Schedule:
        return common.schedule_of(self.resolution)


@dataclass
class TransformerTrainResult:
    """The run's model directories, counters, last losses and the held-out text-to-image check."""

    transformer_dir: Path
    text_encoder_dir: Path
    steps: int
    seconds: float
    final_losses: dict[str, float]
    samples: dict[str, Any] | None
    history: list[dict[str, float]]


def build_text_encoder(config: TransformerConfig, vocab_size: int):
    """A seeded random tiny T5 encoder (``toyworld.tiny_t5_config``) of width ``model.text_channels``."""
    from transformers import T5EncoderModel

    t5 = dict(config.text_encoder)
    if t5.get("d_model", 128) != config.model["text_channels"]:
        raise ValueError(f"text_encoder.d_model ({t5.get('d_model')}) must equal model.text_channels "
                         f"({config.model['text_channels']})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        return T5EncoderModel(toyworld.tiny_t5_config(vocab_size, **t5))


def build_transformer(config: TransformerConfig) -> Infinity:
    """A freshly initialised transformer of the config (seeded by ``config.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Infinity(**config.model, cond_drop_rate=config.cond_drop_rate, drop_path_rate=config.drop_path_rate)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without waiting for the GPU's queued work (pinned, non-blocking)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def encode_captions(tokenizer, encoder, prompts: list[str], device: torch.device) -> TextFeatures:
    """T5 rows of ``prompts`` as ``encode_prompts`` computes them (real tokens incl. EOS), keeping gradients.

    The row bookkeeping is done on the CPU, so the step never waits for the GPU here.
    """
    tokens = tokenize_prompts(tokenizer, prompts, pad_to_max_length=False)
    mask = tokens["attention_mask"]
    lens = mask.sum(dim=1).tolist()
    real = mask.reshape(-1).nonzero().squeeze(1)  # row-major, as hidden[mask.bool()]
    hidden = encoder(input_ids=to_device(tokens["input_ids"], device),
                     attention_mask=to_device(mask, device)).last_hidden_state.float()
    return TextFeatures(hidden.reshape(-1, hidden.shape[-1]).index_select(0, to_device(real, device)), lens)


def append_rows(text: TextFeatures, rows: torch.Tensor, chosen) -> TextFeatures:
    """Append ``rows[b]`` (``rows`` is ``(B, n, C)``) after sample ``b``'s rows wherever ``chosen[b]`` is true.

    Same result as :meth:`TextFeatures.append_rows` per sample, in a few device operations (indices built on the
    CPU); gradients flow to ``text.features`` and ``rows``.
    """
    chosen = [bool(c) for c in chosen]
    if len(chosen) != text.batch_size or rows.shape[0] != text.batch_size:
        raise ValueError(f"need one row block and one flag per sample ({text.batch_size}), got {rows.shape[0]} "
                         f"and {len(chosen)}")
    n = int(rows.shape[1])
    if n == 0 or not any(chosen):
        return text
    lens = torch.tensor(text.lens)
    flags = torch.tensor(chosen)
    new_lens = lens + n * flags
    starts = torch.cumsum(new_lens, 0) - new_lens
    own = torch.repeat_interleave(starts, lens) + (torch.arange(int(lens.sum())) -
                                                   torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens))
    picked = flags.nonzero().squeeze(1)
    extra = (starts[picked] + lens[picked]).repeat_interleave(n) + torch.arange(n).repeat(len(picked))
    dev = text.features.device
    out = text.features.new_zeros(int(new_lens.sum()), text.channels)
    out = out.index_copy(0, to_device(own, dev), text.features)
    out = out.index_copy(0, to_device(extra, dev),
                         rows.to(text.features).index_select(0, to_device(picked, dev)).reshape(-1, text.channels))
    return TextFeatures(out, new_lens.tolist())


def text_variants(config: TransformerConfig, step: int, captions: list[str], channels: int,
                  device: torch.device | str = "cpu") -> tuple[list[str], torch.Tensor, list[bool]]:
    """Step ``step``'s prompts (plain or styled), the rows to append ``(B, rows, channels)`` on ``device`` and
    which samples get them; a pure function of the seed and the step."""
    rng = stream_rng(config.seed, TEXT_STREAM, step)
    B = len(captions)
    styled = rng.random(B) < config.style_prob
    with_rows = styled & (rng.random(B) < config.rows_prob) & (config.rows > 0)
    zero = rng.random(B) < config.rows_zero_prob
    lo, hi = config.rows_log10_std
    std = np.where(zero, 0.0, 10.0 ** rng.uniform(lo, hi, B)).astype(np.float32)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    rows = torch.randn(B, config.rows, channels, generator=gen) * torch.from_numpy(std).view(B, 1, 1)
    prompts = [c + STYLE_SUFFIX if s else c for c, s in zip(captions, styled, strict=True)]
    return prompts, to_device(rows, device), [bool(w) for w in with_rows]


def bit_accuracy(logits: torch.Tensor, gt_bits: torch.Tensor, coarse_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of bits the argmax predicts right: over every token, and over the first ``coarse_tokens``."""
    B, L, V = logits.shape
    right = (logits.detach().view(B, L, V // 2, 2).argmax(-1) == gt_bits.long()).float()
    return right.mean(), right[:, :coarse_tokens].mean()


class LatentReplay:
    """FIFO buffer of (scene, VAE latent) pairs: training batches sample it, and every step replaces its oldest
    ``refresh`` pictures with new ones.

    Scene batch ``b`` of the stream (``refresh`` pictures) lives in slot ``b mod (size / refresh)``; before step
    ``t`` the buffer holds batches ``t .. t + size/refresh - 1``. Its content is therefore a function of the
    step alone, and a resumed run rebuilds exactly the buffer it left.
    """

    def __init__(self, size: int, refresh: int, stream: SceneStream, encode: Callable[[list], torch.Tensor],
                 start_step: int):
        if size % refresh:
            raise ValueError("replay size must be a multiple of the refresh count")
        self.size, self.refresh, self.slots = size, refresh, size // refresh
        self.stream, self.encode = stream, encode
        self.scenes: list = [None] * size
        self.z: torch.Tensor | None = None
        self.next_batch = start_step
        for _ in range(self.slots):
            self._add()

    def _add(self) -> None:
        b = self.next_batch
        scenes = self.stream.get(b)
        z = self.encode(scenes)
        if self.z is None:
            self.z = z.new_empty((self.size, *z.shape[1:]))
        lo = (b % self.slots) * self.refresh
        self.z[lo:lo + self.refresh] = z
        self.scenes[lo:lo + self.refresh] = scenes
        self.next_batch += 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[list, torch.Tensor]:
        """``batch`` random (scene, latent) pairs (with replacement; indices from the CPU ``generator``, so no
        device sync), then the refresh for the next step."""
        idx = torch.randint(self.size, (batch,), generator=generator)
        z = self.z.index_select(0, to_device(idx, self.z.device))
        scenes = [self.scenes[i] for i in idx.tolist()]
        self._add()
        return scenes, z


def deepen_state(state: dict[str, torch.Tensor], model: Infinity) -> dict[str, torch.Tensor]:
    """A trained transformer's state for ``model``, which has more blocks but is otherwise the same (function
    preserving): the trained blocks keep their order, spread evenly over the new depth, and every new block starts
    from the model's own initialisation with its three residual outputs (self-attention, cross-attention and
    feed-forward projections) zeroed, so it passes its input through unchanged until training moves it (the
    zero-initialised residual branch of Goyal et al. 2017, "Accurate, large minibatch SGD", §5.1, used for depth).
    A state with as many blocks as ``model`` is returned as it is."""
    old = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    new = len(model.blocks)
    if old == new:
        return state
    if not 0 < old < new:
        raise CheckpointError(f"cannot grow a transformer of {old} blocks into one of {new}")
    # trained block i goes to position place[i]: evenly spread, first stays first, last stays last
    place = [round(i * (new - 1) / (old - 1)) if old > 1 else 0 for i in range(old)]
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    own = model.state_dict()
    for j in range(new):
        prefix = f"blocks.{j}."
        if j in place:
            src = f"blocks.{place.index(j)}."
            out.update({prefix + k[len(src):]: v for k, v in state.items() if k.startswith(src)})
            continue
        block = {k: v.clone() for k, v in own.items() if k.startswith(prefix)}
        for proj in ("sa.proj", "ca.proj", "ffn.fc2"):
            for part in ("weight", "bias"):
                if prefix + f"{proj}.{part}" in block:
                    block[prefix + f"{proj}.{part}"].zero_()
        out.update(block)
    log.info("transformer: %d trained blocks placed at %s of %d; the others start as identities", old, place, new)
    return out


def load_initial_weights(transformer: Infinity, text_encoder, directory: Path) -> None:
    """Copy the weights of ``directory/transformer`` and ``directory/text_encoder`` into the built models (strict:
    the configs must match, except that the transformer may be deeper, see :func:`deepen_state`)."""
    from transformers import T5EncoderModel

    for name in ("transformer", "text_encoder"):
        if not (directory / name / "config.json").is_file():
            raise CheckpointError(f"init_from {directory} has no {name}/; give a weights directory written by "
                                  "`python -m editinfinity.train.toy` (or the bundled presets/toy)")
    pairs = ((transformer, Infinity.from_pretrained(str(directory / "transformer"))),
             (text_encoder, T5EncoderModel.from_pretrained(str(directory / "text_encoder"))))
    for model, trained in pairs:
        state = {k: v.float() for k, v in trained.state_dict().items()}
        if model is transformer:
            state = deepen_state(state, transformer)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"init_from {directory}: the weights do not fit the configured model ({exc}); "
                                  "use the model config those weights were trained with") from exc
    log.info("transformer: initialised from %s", directory)


def attention_targets(tokenizer, scenes: list, schedule, rows: int, device) -> CrossAttentionTargets:
    """The attention-loss probe of a batch (train/attention_loss.py) with its tensors on ``device``."""
    weights, objects, valid = word_token_weights(tokenizer, scenes, rows)
    coverage = object_coverage(scenes, schedules.last_grid(schedule))
    return CrossAttentionTargets(schedule, to_device(weights, device), to_device(objects, device),
                                 to_device(valid, device), to_device(coverage, device))


def load_frozen_vae(vae: BSQVAE | str | Path, device: torch.device) -> BSQVAE:
    """The VAE that codes the pictures, frozen, in eval mode on ``device``."""
    if not isinstance(vae, BSQVAE):
        vae = BSQVAE.from_pretrained(str(vae))
    return vae.to(device).float().eval().requires_grad_(False)


def train_transformer(config: TransformerConfig, run_dir: str | Path, vae: BSQVAE | str | Path, *,
                      tokenizer_dir: str | Path | None = None, device: str | torch.device | None = None,
                      resume: bool = False, extend: bool = False, progress: bool = False,
                      stop_at: int | None = None,
                      on_save: Callable[[Infinity, Any, bool], None] | None = None) -> TransformerTrainResult:
    """Train (or resume) the transformer and T5 in ``run_dir`` against the frozen ``vae``.

    Writes ``checkpoint/`` every ``checkpoint_minutes``, ``log.jsonl``, and when the budget is spent
    ``transformer/`` and ``text_encoder/`` (``save_pretrained``, float32), ``tokenizer/`` and ``result.json``.
    ``on_save(transformer, text_encoder, final)`` runs after every checkpoint (e.g. to export weights as they
    improve). ``stop_at`` ends this call after that step without finishing the run; ``extend`` (with ``resume``)
    continues a finished run for another budget with a fresh warm-up and cosine cycle.
    """
    from transformers import AutoTokenizer

    from ..models.bundle import bundled_tokenizer_dir

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = common.resolve_device(device)
    common.configure_backends(dev)
    schedule = config.schedule()
    cfg_dict = common.config_dict(config)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else bundled_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), legacy=True)
    tokenizer.model_max_length = 512
    vae_model = load_frozen_vae(vae, dev)
    if vae_model.config.codebook_dim != config.model["codebook_dim"]:
        raise ValueError(f"the VAE codes {vae_model.config.codebook_dim} bits but the transformer expects "
                         f"{config.model['codebook_dim']}")
    transformer = build_transformer(config)
    text_encoder = build_text_encoder(config, len(tokenizer))
    if config.init_from and common.find_checkpoint(run_dir) is None:
        load_initial_weights(transformer, text_encoder, Path(config.init_from))
    transformer.to(dev).train()
    text_encoder.to(dev)
    if config.compile_blocks:
        transformer.set_block_compile(True)
    text_encoder.train(config.train_text_encoder).requires_grad_(config.train_text_encoder)
    groups = common.decay_groups(list(transformer.named_parameters()), NO_DECAY)
    if config.train_text_encoder:
        groups += common.decay_groups(list(text_encoder.named_parameters()), NO_DECAY, config.text_lr_scale)
    opt = common.adamw(groups, config.lr, config.betas, config.weight_decay, dev)
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    replay_gen = torch.Generator().manual_seed(config.seed + 1)
    generators = {"train": gen, "replay": replay_gen}
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    state = common.TrainState()
    ckpt = common.find_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise CheckpointError(f"{run_dir} already holds a training checkpoint; pass --resume to continue it "
                              "or choose another output directory")
    if ckpt is not None:
        state = common.load_checkpoint(ckpt, modules, opt, generators)
        log.info("transformer: resumed %s at step %d (%.0f s trained)", ckpt, state.step, state.elapsed)
        if extend and state.finished:
            state.extend()
            log.info("transformer: extending the finished run by %s", common.budget_text(config))
    n_params = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    noise_layers = len(schedule) if config.noise_layers <= 0 else config.noise_layers
    coarse = sum(schedules.scale_lengths(schedule)[:4])
    log.info("transformer: %.2fM parameters (+ T5 %.2fM, %s), batch %d, %d tokens per picture, device %s",
             n_params / 1e6, n_text / 1e6, "trained" if config.train_text_encoder else "frozen", config.batch_size,
             schedules.num_tokens(schedule), dev)

    def save(final: bool = False) -> None:
        common.save_checkpoint(run_dir, modules, opt, state, generators, cfg_dict)
        if on_save is not None:
            on_save(transformer, text_encoder, final)

    @torch.no_grad()
    def encode(scenes: list) -> torch.Tensor:
        # float32 encoder, exactly as the prepare stage codes a picture (bits are signs)
        return vae_model.encode_raw(render_batch(scenes, dev, noise=config.image_noise, generator=gen))

    attn_loss = config.attn_loss_weight > 0
    replay_on = config.replay_size > 0
    per_step = config.replay_refresh if replay_on else config.batch_size
    with SceneStream(config.seed, TRANSFORMER_STREAM, per_step, start=state.step, width=config.image_size,
                     height=config.image_size, workers=config.workers,
                     two_shape_prob=config.two_shape_prob) as stream:
        replay = None
        if replay_on:
            t0 = time.perf_counter()
            replay = LatentReplay(config.replay_size, config.replay_refresh, stream, encode, state.step)
            log.info("transformer: latent replay of %d pictures filled in %.1f s", config.replay_size,
                     time.perf_counter() - t0)

        def step_fn(step: int) -> dict[str, torch.Tensor]:
            if replay is not None:
                scenes, z = replay.sample(config.batch_size, replay_gen)
            else:
                scenes = stream.get(step)
                z = encode(scenes)
            prompts, rows, chosen = text_variants(config, step, [toyworld.caption(s) for s in scenes],
                                                  config.model["text_channels"], dev)
            gt_bits, x_in = bitwise_self_correction(z, schedule, noise_layers, config.noise_strength, gen)
            with torch.set_grad_enabled(config.train_text_encoder):  # float32, as the prepare stage runs it
                text = encode_captions(tokenizer, text_encoder, prompts, dev)
            text = append_rows(text, rows, chosen)
            probe = attention_targets(tokenizer, scenes, schedule, max(text.lens), dev) if attn_loss else None
            with common.autocast(dev):
                logits = transformer(text, x_in, schedule, attention_probe=probe, generator=gen)
            logits = logits.float()
            loss = transformer.bit_loss(logits, gt_bits, schedule)
            extra = {}
            if probe is not None:
                attn = probe.loss()
                loss = loss + config.attn_loss_weight * attn
                extra["attn_loss"] = attn.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            acc, acc_coarse = bit_accuracy(logits, gt_bits, coarse)
            return {"loss": loss.detach().float(), "bit_acc": acc, "coarse_acc": acc_coarse, "grad_norm": grad_norm,
                    **extra}

        last = common.run_steps(
            "transformer", run_dir, state, common.Budget(steps=config.steps, minutes=config.minutes),
            step_fn=step_fn, optimizer=opt, save=save, device=dev, samples_per_step=config.batch_size,
            lr_fn=lambda step, total: common.lr_at(step, config.lr, config.warmup_steps, total, config.min_lr_ratio),
            log_seconds=config.log_seconds, checkpoint_minutes=config.checkpoint_minutes, progress=progress,
            stop_at=stop_at)
    t_dir, e_dir = run_dir / "transformer", run_dir / "text_encoder"
    samples = None
    if state.finished:
        transformer.eval()
        text_encoder.eval()
        common.save_dir(t_dir, transformer.save_pretrained)
        common.save_dir(e_dir, text_encoder.save_pretrained)
        common.save_dir(run_dir / "tokenizer", lambda tmp: shutil.copytree(tok_dir, tmp))
        if on_save is not None:
            on_save(transformer, text_encoder, True)
        by_cfg: dict[str, Any] = {}
        if config.sample_images > 0:
            from ..evaluation.toy_judge import text_to_image_eval

            for cfg in (config.cfg, *config.extra_cfgs):
                t0 = time.perf_counter()
                summary = text_to_image_eval(transformer, vae_model, tokenizer, text_encoder, config.sample_images,
                                             schedule=schedule, cfg=cfg, tau=config.tau, seed=config.seed)
                log.info("transformer: held-out text-to-image at cfg %g: objects as prompted %.1f%%, exact match "
                         "%.1f%% (%d pictures, %.0f s)", cfg, 100 * summary["objects_ok_rate"],
                         100 * summary["matches_rate"], summary["generations"], time.perf_counter() - t0)
                by_cfg[str(cfg)] = _without_cases(summary)
                if samples is None:
                    samples = summary
        result = {"steps": state.step, "seconds": round(state.elapsed, 2), "final": last,
                  "samples": _without_cases(samples), "samples_by_cfg": by_cfg, "config": cfg_dict,
                  "hardware": common.hardware(), "parameters": n_params, "text_encoder_parameters": n_text}
        (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return TransformerTrainResult(transformer_dir=t_dir, text_encoder_dir=e_dir, steps=state.step,
                                  seconds=state.elapsed, final_losses=last, samples=samples, history=state.history)


def _without_cases(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    out = {k: v for k, v in summary.items() if k != "cases"}
    out["examples"] = summary.get("cases", [])[:8]
    return out

