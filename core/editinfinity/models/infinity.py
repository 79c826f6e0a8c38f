"""Infinity: the bitwise next-scale autoregressive text-to-image transformer (state-dict compatible).

A sequence holds the scales of a schedule coarse to fine (the 1x1 start token is scale 0); every token predicts
its ``d`` bits as ``2d`` logits. Text conditioning: RMS-normed T5 rows are pooled into ``cond`` (start token,
shared AdaLN, head AdaLN) and projected into the cross-attention memory. Teacher forcing is block-causal (scale k
sees scales <= k); generation runs scale by scale with a KV cache and classifier-free guidance on the logits.

Precision: the text path, AdaLN, norms, q/k normalisation + RoPE, the head and the losses run in float32; under
bf16 autocast (GPU) the block matmuls and attention run in bf16. Names of parameters equal the official keys
except ``blocks.{i}`` (see :mod:`.checkpoints.infinity` for the mapping).

Speed and memory (training): :meth:`Infinity.cast_frozen` stores the block matmul weights in bf16 (identical results
under bf16 autocast, half the memory, no per-call weight casts); :meth:`Infinity.set_activation_checkpointing`
recomputes the first N blocks in the backward pass; :meth:`Infinity.set_block_compile` runs the teacher-forced
training blocks through ``torch.compile``; :class:`TextConditionCache` runs a frozen text path once per training run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from . import schedules
from .attention_maps import AttentionMapCollector
from .bit_outputs import bit_loss, sample_bits, summed_bit_ce
from .checkpoints.infinity import (
    LoadReport,
    chunked_block_key,
    flat_block_key,
    flatten_block_keys,
    load_infinity_state_dict,
    to_official_state_dict,
)
from .layers import (
    AdaLNBeforeHead,
    AttentionProbe,
    CrossAttention,
    CrossAttnBlock,
    KVCache,
    PoolAttention,
    RMSNorm,
    SelfAttention,
    TextAttentivePool,
    check_bias_mode,
    drop_path_scales,
    key_padding_mask,
)
from .quantizer import bilinear_resize, bits_to_codes, next_scale_input
from .rope import rope_table
from .text import TextFeatures

__all__ = [
    "AttentionMapCollector",
    "GenerationOutput",
    "Infinity",
    "LoadReport",
    "TextCondition",
    "TextConditionCache",
    "bit_loss",
    "chunked_block_key",
    "flat_block_key",
    "flatten_block_keys",
    "load_infinity_state_dict",
    "sample_bits",
    "summed_bit_ce",
    "to_official_state_dict",
]


@dataclass
class TextCondition:
    """The text path's outputs for a batch: pooled ``cond_BD`` (B, D), shared modulation ``gss`` (B, 1, 6, C),
    cross-attention ``memory`` (B, T, D), its ``mask`` (B, T) bool (True = real row) and the SDPA form of that
    mask, ``attn_mask`` (B, 1, 1, T), or None when no row is padded."""

    cond_BD: torch.Tensor
    gss: torch.Tensor
    memory: torch.Tensor
    mask: torch.Tensor
    attn_mask: torch.Tensor | None
    #: (B,) bools of the samples whose text condition dropout replaced (train mode), None when none was drawn
    dropped: list[bool] | None = None


class TextConditionCache:
    """The text path's outputs for one fixed text batch, computed once, with and without condition dropout.

    During LoRA training neither the text nor the text path (``cfg_uncond``, ``text_norm``, the pools, the memory
    MLP, ``shared_ada_lin``) changes, so :meth:`Infinity.forward` with ``text_cache=`` reuses these tensors instead
    of re-running the text path every update. Condition dropout keeps its exact random draw; a dropped sample takes
    the rows of the unconditional variant (``cfg_uncond[:len]``, as :meth:`Infinity.encode_text` builds them),
    chosen on the device without a host sync. Build a new cache if the text or the text path's weights change.
    """

    def __init__(self, model: Infinity, text: TextFeatures):
        text = text.to(model.device)
        trainable = [n for n, p in model.text_path_parameters() if p.requires_grad]
        if text.features.requires_grad or trainable:
            raise ValueError("TextConditionCache needs a frozen text path and text without gradients; trainable: "
                             f"{trainable or ['the text features']}")
        with torch.no_grad():
            self.kept = model.encode_text(text, allow_dropout=False)
            self.dropped = model.encode_text(model.unconditional_text(text.lens), allow_dropout=False)
        self.text = text
        self.lens = list(text.lens)

    def select(self, drop: torch.Tensor | None) -> TextCondition:
        """The condition of a batch whose samples ``drop`` (B,) bool lost their text (None: nothing dropped)."""
        if drop is None:
            return self.kept
        d = drop.to(self.kept.cond_BD.device)

        def pick(kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
            return torch.where(d.view(-1, *([1] * (kept.ndim - 1))), dropped, kept)

        k, u = self.kept, self.dropped
        return TextCondition(cond_BD=pick(k.cond_BD, u.cond_BD), gss=pick(k.gss, u.gss),
                             memory=pick(k.memory, u.memory), mask=k.mask, attn_mask=k.attn_mask)


def _run_block(blk: CrossAttnBlock, x: torch.Tensor, gss: torch.Tensor, memory: torch.Tensor,
               attn_mask: torch.Tensor | None, rope: torch.Tensor, segments: Sequence[int],
               keep: torch.Tensor | None) -> torch.Tensor:
    """One teacher-forced block without cache or probe: the unit that training checkpoints and compiles."""
    return blk(x, gss, memory, attn_mask, rope, segments, None, keep)


@dataclass
class GenerationOutput:
    """``summed_codes`` (B, d, hK, wK): sum of every scale's (possibly blended) codes on the last grid;
    ``bits``: per scale (B, h_k, w_k, d) uint8; ``logits``: per scale (B, h_k*w_k, d, 2) sampler inputs if kept."""

    summed_codes: torch.Tensor
    bits: list[torch.Tensor]
    logits: list[torch.Tensor] | None = None


class Infinity(ModelMixin, ConfigMixin):
    """Infinity transformer.

    Args:
        depth: number of blocks. embed_dim: width ``C`` (also the condition width). num_heads: heads (``C/H``
            must be a multiple of 4 for the 2D RoPE).
        mlp_ratio: FFN width ``round(C * mlp_ratio / 256) * 256`` (Python's half-to-even ``round``, as the reference).
        text_channels: T5 width ``Ct5`` (a multiple of 128). text_maxlen: rows of the unconditional table.
        codebook_dim: bits per token ``d``; the head predicts ``2d`` logits.
        norm_eps: eps of every norm. bias_mode: ``"upstream"`` adds the trained q/v biases, ``"editinfinity"``
            ignores them as the EditInfinity code does.
        cond_drop_rate: probability (train mode) of replacing a sample's text by the unconditional rows.
        drop_path_rate: stochastic depth of the last block (linear from 0), train mode only.
        num_levels: rows of the level (scale) embedding. rope_size: side of the RoPE position table.
        block_chunks: how the official checkpoint groups blocks (key names only; see ``to_official_state_dict``).
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["CrossAttnBlock"]

    @register_to_config
    def __init__(self, depth: int, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0, text_channels: int = 2048,
                 text_maxlen: int = 512, codebook_dim: int = 32, norm_eps: float = 1e-6, bias_mode: str = "upstream",
                 cond_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_levels: int = 15,
                 rope_size: int = 128, block_chunks: int = 1):
        super().__init__()
        check_bias_mode(bias_mode)
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"`embed_dim` ({embed_dim}) must split into `num_heads` ({num_heads}) heads whose "
                             "width is a multiple of 4 (2D RoPE)")
        ffn_hidden = round(embed_dim * mlp_ratio / 256) * 256
        if ffn_hidden <= 0:
            raise ValueError(f"FFN width round({embed_dim} * {mlp_ratio} / 256) * 256 is 0; use a wider model")
        if block_chunks < 1 or depth % block_chunks:
            raise ValueError(f"`block_chunks` ({block_chunks}) must divide `depth` ({depth})")
        C, D = embed_dim, embed_dim
        self.cond_drop_rate, self.drop_path_rate = float(cond_drop_rate), float(drop_path_rate)
        self.gradient_checkpointing = False
        #: Teacher-forced blocks (from the first) recomputed in the backward pass; see set_activation_checkpointing.
        self.checkpoint_blocks = 0
        self._compile_blocks = False
        self._compiled_block: Callable | None = None
        self._rope_cache: dict = {}
        self._schedule_cache: dict = {}

        # 1. text conditioning
        # Drawn on the CPU (seeded CPU generator), then placed where the model is being built.
        self.cfg_uncond = nn.Parameter(self._initial_uncond_rows(text_maxlen, text_channels).to(torch.empty(0).device))
        self.text_norm = RMSNorm(text_channels, eps=norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, D, bias_mode)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        # 2. inputs: start token, scale (level) embedding, bit codes -> width C
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(num_levels, C)
        self.word_embed = nn.Linear(codebook_dim, C)
        # 3. shared AdaLN mapping, backbone, head
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * C))
        self.blocks = nn.ModuleList(
            CrossAttnBlock(C, num_heads, ffn_hidden, D, norm_eps, bias_mode) for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(C, D, norm_eps)
        self.head = nn.Linear(C, 2 * codebook_dim)
        self.init_weights()

    @staticmethod
    def _initial_uncond_rows(rows: int, channels: int) -> torch.Tensor:
        """The reference's deterministic unconditional table: trunc-normal(std 1.2, bounds +-2) from a CPU generator
        seeded 0, divided by sqrt(Ct5) (also fills the tail of a shorter checkpoint table)."""
        t = torch.empty(rows, channels, device="cpu")
        nn.init.trunc_normal_(t, std=1.2, generator=torch.Generator(device="cpu").manual_seed(0))
        return t / channels**0.5

    @torch.no_grad()
    def init_weights(self, aln_init: float = 1e-3, aln_gamma_init: float = 5e-6, head_scale: float = 0.02) -> None:
        """Random initialisation of the training recipe (truncated normal, small AdaLN gains and head).

        ``cfg_uncond`` keeps its deterministic rows and ``scale_mul_1H11`` its ln 4.
        """
        C = self.config.embed_dim
        std = math.sqrt(1 / C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm | RMSNorm):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, PoolAttention):
                nn.init.trunc_normal_(m.mat_q, std=std)
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.head_nm.ada_lin[-1].weight.mul_(aln_init)
        self.head.weight.mul_(head_scale)
        proj_scale = 1 / math.sqrt(2 * len(self.blocks))
        for blk in self.blocks:
            for lin in (blk.sa.proj, blk.ca.proj, blk.ffn.fc2):
                lin.weight.mul_(proj_scale)
            blk.ada_gss.copy_(torch.randn_like(blk.ada_gss) / C**0.5)
            blk.ada_gss[:, :, :2].mul_(aln_gamma_init)
            blk.ada_gss[:, :, 2:].mul_(aln_init)

    @property
    def device(self) -> torch.device:
        """The model's device (that of ``pos_start``). ModelMixin's own property walks every submodule on each call
        (tens of milliseconds on a LoRA-wrapped 2B model, whose forward asks once per block); this is O(1)."""
        return self.pos_start.device

    # -- settings -------------------------------------------------------------------------------------------------

    def set_bias_mode(self, bias_mode: str) -> None:
        """Switch between ``"upstream"`` (q/v biases added) and ``"editinfinity"`` (ignored) semantics."""
        check_bias_mode(bias_mode)
        for m in self.modules():
            if isinstance(m, SelfAttention | CrossAttention | PoolAttention):
                m.bias_mode = bias_mode
        self.register_to_config(bias_mode=bias_mode)

    def set_regularization(self, cond_drop_rate: float | None = None, drop_path_rate: float | None = None) -> None:
        """Change the train-mode condition dropout and DropPath rates."""
        if cond_drop_rate is not None:
            self.cond_drop_rate = float(cond_drop_rate)
            self.register_to_config(cond_drop_rate=self.cond_drop_rate)
        if drop_path_rate is not None:
            self.drop_path_rate = float(drop_path_rate)
            self.register_to_config(drop_path_rate=self.drop_path_rate)

    # -- speed and memory -----------------------------------------------------------------------------------------

    def block_linears(self) -> list[nn.Linear]:
        """The matmul layers inside the blocks (q/k/v, projections, cross-attention, FFN; ~98% of the weights).

        A LoRA-wrapped layer counts by its base layer; the adapters' own layers are not included.
        """
        return [m for blk in self.blocks for name, m in blk.named_modules()
                if isinstance(m, nn.Linear) and "lora_" not in name]

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Storage dtype of the block matmul weights (see :meth:`cast_frozen`)."""
        return self.blocks[0].sa.mat_qkv.weight.dtype

    @torch.no_grad()
    def cast_frozen(self, dtype: torch.dtype) -> Infinity:
        """Store the block matmul weights (and their biases) in ``dtype``; everything else stays as it is.

        Those layers only run under autocast on the GPU, where ``F.linear`` casts weight and bias to the autocast
        dtype on every call: storing them in bf16 gives identical results under bf16 autocast, halves their memory
        and skips the per-call casts (and the cast copies autograd would keep for the backward pass). The parts that
        run with autocast disabled (text path, AdaLN, norms, embeddings, head) keep their float32 weights, and LoRA
        adapters are skipped. With bf16 storage the model must run under bf16 autocast (``ModelBundle.autocast``);
        ``cast_frozen(torch.float32)`` goes back (to the bf16-rounded values). Returns ``self``.
        """
        for m in self.block_linears():
            if m.weight.dtype != dtype:
                m.to(dtype)
        return self

    def set_activation_checkpointing(self, blocks: int) -> None:
        """Recompute the first ``blocks`` blocks in the backward pass instead of keeping their activations
        (teacher forcing with gradients only; 0 = none, ``depth`` = every block). Random draws (condition dropout,
        DropPath) are made before the blocks and LoRA dropout's RNG state is restored, so the recomputation equals
        the original forward."""
        self.checkpoint_blocks = max(0, min(int(blocks), len(self.blocks)))

    def set_block_compile(self, enabled: bool) -> None:
        """Run the teacher-forced blocks through ``torch.compile`` in train mode with gradients (training stages).

        Generation (KV cache, a new shape every scale), eval-mode forwards and attention probes stay eager. The
        blocks share their compiled graphs (same code, parameters are graph inputs; a few variants: the first
        block's input has no gradient, LoRA or not); the first update of a process compiles. Random ops (LoRA
        dropout) stay eager kernels (``fallback_random``), so their draws equal the eager ones. Compiled code is
        cached on disk (:mod:`.compile_cache`), so a later process starts warm.
        """
        self._compile_blocks = bool(enabled)
        if enabled and self._compiled_block is None:
            from .compile_cache import prepare_compile_cache

            prepare_compile_cache()
            self._compiled_block = torch.compile(_run_block, dynamic=False, options={"fallback_random": True})

    def _schedule_tensor(self, kind: str, sched, device: torch.device, build: Callable) -> torch.Tensor:
        """A per-schedule constant (level index, loss weights) kept on ``device``: no host copy every update."""
        key = (kind, tuple(sched), str(device))
        found = self._schedule_cache.get(key)
        if found is None:
            found = self._schedule_cache[key] = build(sched).to(device)
        return found

    # -- pieces -----------------------------------------------------------------------------------------------------

    def unconditional_text(self, lens: Sequence[int]) -> TextFeatures:
        """``cfg_uncond[:len_b]`` for every sample: the negative branch with the conditional text's lengths."""
        if max(lens) > self.cfg_uncond.shape[0]:
            raise ValueError(f"a text of {max(lens)} rows exceeds the {self.cfg_uncond.shape[0]} unconditional rows; "
                             "shorten the prompt (learned rows count too)")
        return TextFeatures(torch.cat([self.cfg_uncond[:n] for n in lens], dim=0), list(lens))

    def text_path_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the text path: unconditional rows, text norm, pool, memory MLP, shared AdaLN map."""
        return [(n, p) for n, p in self.named_parameters()
                if n.split(".")[0] in ("cfg_uncond", "text_norm", "text_proj_for_sos", "text_proj_for_ca",
                                       "shared_ada_lin")]

    def _draw_condition_drop(self, batch: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """(B,) bool: the samples whose text is replaced by the unconditional rows (train mode, rate > 0), else None."""
        if not (self.training and self.cond_drop_rate > 0):
            return None
        gen_device = generator.device if generator is not None else "cpu"
        return torch.rand(batch, generator=generator, device=gen_device) < self.cond_drop_rate

    def encode_text(self, text: TextFeatures, generator: torch.Generator | None = None,
                    allow_dropout: bool = True) -> TextCondition:
        """Text path in float32: condition dropout (train mode), RMS norm, attentive pool, memory MLP, AdaLN map."""
        text = text.to(self.device)
        feats = text.features.float()
        drop = self._draw_condition_drop(text.batch_size, generator) if allow_dropout else None
        if drop is not None:
            drop = drop.tolist()
            if any(drop):
                uncond = self.unconditional_text(text.lens).split()
                own = TextFeatures(feats, text.lens).split()
                feats = torch.cat([u if d else s for s, u, d in zip(own, uncond, drop, strict=True)], dim=0)
        with torch.autocast(device_type=self.device.type, enabled=False):
            normed = self.text_norm(feats)
            rows, mask = TextFeatures(normed, text.lens).padded()
            attn_mask = key_padding_mask(mask, text.lens)
            cond_BD = self.text_proj_for_sos(rows, attn_mask).float()
            memory, _ = TextFeatures(self.text_proj_for_ca(normed), text.lens).padded()
            gss = self.shared_ada_lin(cond_BD).view(cond_BD.shape[0], 1, 6, -1)
        return TextCondition(cond_BD=cond_BD, gss=gss, memory=memory, mask=mask, attn_mask=attn_mask, dropped=drop)

    def embed_tokens(self, codes_BLd: torch.Tensor) -> torch.Tensor:
        """Next-scale inputs (B, n, d) -> (B, n, C), float32."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.word_embed(codes_BLd.float())

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head: AdaLN from the pooled condition, then the bit logits (B, L, 2d), float32."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.head(self.head_nm(h.float(), cond_BD.float()))

    def rope(self, schedule, device: torch.device | None = None) -> torch.Tensor:
        """(2, L, hd/2) cos/sin of the schedule's tokens (cached per schedule and device)."""
        device = torch.device(device or self.device)
        key = (tuple(schedules.normalize_schedule(schedule)), str(device))
        if key not in self._rope_cache:
            hd = self.config.embed_dim // self.config.num_heads
            self._rope_cache[key] = rope_table(key[0], hd, self.config.rope_size).to(device)
        return self._rope_cache[key]

    def _check_schedule(self, schedule) -> list[tuple[int, int, int]]:
        sched = schedules.normalize_schedule(schedule)
        if not sched:
            raise ValueError("the scale schedule is empty")
        if len(sched) > self.lvl_embed.num_embeddings:
            raise ValueError(f"schedule has {len(sched)} scales but the model has {self.lvl_embed.num_embeddings} "
                             "level embeddings")
        return sched

    def _drop_path_keep(self, batch: int, generator: torch.Generator | None) -> list[torch.Tensor | None]:
        depth = len(self.blocks)
        if not self.training or self.drop_path_rate <= 0:
            return [None] * depth
        rates, device = torch.linspace(0, self.drop_path_rate, depth).tolist(), self.device
        return [drop_path_scales(r, batch, generator, device) if r > 0 else None for r in rates]

    # -- teacher forcing --------------------------------------------------------------------------------------------

    def forward(self, text: TextFeatures, x_wo_prefix: torch.Tensor, schedule,
                attention_probe: AttentionProbe | None = None,
                generator: torch.Generator | None = None,
                text_cache: TextConditionCache | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, 2d) from the next-scale inputs ``x_wo_prefix`` (B, L-1, d).

        ``generator`` drives condition dropout and DropPath (train mode only). ``attention_probe`` (e.g. an
        :class:`AttentionMapCollector`) sees every block's cross-attention queries/keys of sample 0 (a ``batched``
        probe those of every sample; its ``on_condition(cond)``, if any, first gets the :class:`TextCondition`).
        ``text_cache`` (built from this same ``text``) replaces the text path by its cached outputs.
        """
        sched = self._check_schedule(schedule)
        lengths = schedules.scale_lengths(sched)
        B, L = text.batch_size, sum(lengths)
        expected = (B, L - 1, self.config.codebook_dim)
        if tuple(x_wo_prefix.shape) != expected:
            raise ValueError(f"`x_wo_prefix` must be {expected} for this text batch and schedule, "
                             f"got {tuple(x_wo_prefix.shape)}")
        if text_cache is None:
            cond = self.encode_text(text, generator)
        else:
            if text_cache.lens != list(text.lens):
                raise ValueError(f"`text_cache` was built for text lengths {text_cache.lens}, got {list(text.lens)}")
            cond = text_cache.select(self._draw_condition_drop(B, generator))
        notify = getattr(attention_probe, "on_condition", None)
        if notify is not None:  # a batched probe learns which samples lost their text
            notify(cond)
        sos = cond.cond_BD.unsqueeze(1) + self.pos_start
        x = torch.cat([sos, self.embed_tokens(x_wo_prefix.to(self.device))], dim=1)
        x = x + self.lvl_embed.weight[self._schedule_tensor("level", sched, self.device,
                                                            schedules.scale_index_per_token)]
        rope = self.rope(sched)
        keep = self._drop_path_keep(B, generator)
        grad = torch.is_grad_enabled()
        # Checkpointing and compilation apply to training forwards only (gradients on, no probe).
        plain = not grad or attention_probe is not None
        run = _run_block
        if self._compile_blocks and self.training and not plain and self._compiled_block is not None:
            run = self._compiled_block
        for i, blk in enumerate(self.blocks):
            if grad and self.gradient_checkpointing:  # diffusers' switch: every block
                args = (x, cond.gss, cond.memory, cond.attn_mask, rope, lengths, None, keep[i], attention_probe, i)
                x = self._gradient_checkpointing_func(blk, *args)
            elif plain:
                x = blk(x, cond.gss, cond.memory, cond.attn_mask, rope, lengths, None, keep[i], attention_probe, i)
            elif i < self.checkpoint_blocks:
                x = torch.utils.checkpoint.checkpoint(run, blk, x, cond.gss, cond.memory, cond.attn_mask, rope,
                                                      lengths, keep[i], use_reentrant=False)
            else:
                x = run(blk, x, cond.gss, cond.memory, cond.attn_mask, rope, lengths, keep[i])
        return self.logits(x, cond.cond_BD)

    def bit_loss(self, logits: torch.Tensor, gt_bits: torch.Tensor, schedule, reweight: bool = True) -> torch.Tensor:
        """See :func:`bit_loss` (same values; the reweighting table stays on the device between calls)."""
        B, L, V = logits.shape
        sched = schedules.normalize_schedule(schedule)
        if not reweight or tuple(gt_bits.shape) != (B, L, V // 2) or schedules.num_tokens(sched) != L:
            return bit_loss(logits, gt_bits, schedule, reweight)  # the plain mean, or its error message
        weights = self._schedule_tensor("loss_weights", sched, logits.device, schedules.loss_weights)
        ce = F.cross_entropy(logits.float().view(B, L, -1, 2).permute(0, 3, 1, 2), gt_bits.long(), reduction="none")
        return ce.mean(dim=-1).mul(weights[None]).sum(dim=-1).mean()

    def summed_bit_ce(self, logits: torch.Tensor, gt_bits: torch.Tensor) -> torch.Tensor:
        """See :func:`summed_bit_ce`."""
        return summed_bit_ce(logits, gt_bits)

    # -- generation -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, text: TextFeatures, schedule, cfg: float | Sequence[float] = 4.0,
                 tau: float | Sequence[float] = 0.5, top_k: int = 900, top_p: float = 0.97,
                 generator: torch.Generator | None = None,
                 on_scale: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 keep_logits: bool = False) -> GenerationOutput:
        """Sample every scale's bits with a KV cache and classifier-free guidance.

        With any ``cfg != 1`` the batch is doubled with unconditional rows ``cfg_uncond[:len_b]``; per scale the
        logits are ``cfg * l_c + (1 - cfg) * l_u`` of ``logits / tau``. Bits are drawn by :func:`sample_bits`, one
        ``torch.multinomial`` call per scale in order (``top_k=1`` is greedy). ``on_scale(k, codes_up)`` receives
        scale k's codes on the last grid (B, d, hK, wK) and returns the codes to accumulate (edit blending); the
        next scale's input is the bilinear resize of the running sum, shared by both guidance halves.
        """
        sched = self._check_schedule(schedule)
        K, d = len(sched), self.config.codebook_dim
        cfgs, taus = _per_scale(cfg, K, "cfg"), _per_scale(tau, K, "tau")
        text = text.to(self.device)
        B = text.batch_size
        guided = any(c != 1 for c in cfgs)
        full = text.cat(self.unconditional_text(text.lens)) if guided else text
        cond = self.encode_text(full, allow_dropout=False)  # sampling never drops the condition (nor paths)
        rows = cond.cond_BD.shape[0]
        hK, wK = schedules.last_grid(sched)
        offsets = schedules.scale_offsets(sched)
        rope = self.rope(sched)
        caches = [KVCache() for _ in self.blocks]
        acc: torch.Tensor | None = None
        x = cond.cond_BD.unsqueeze(1) + self.pos_start
        bits_out, logits_out = [], []
        for k, (_, h, w) in enumerate(sched):
            x = x + self.lvl_embed.weight[k]
            rope_k = rope[:, offsets[k]:offsets[k + 1]]
            for i, blk in enumerate(self.blocks):
                x = blk(x, cond.gss, cond.memory, cond.attn_mask, rope_k, None, caches[i], None, None, i)
            if guided and cfgs[k] != 1:
                lg = self.logits(x, cond.cond_BD).mul(1 / taus[k])
                lg = cfgs[k] * lg[:B] + (1 - cfgs[k]) * lg[B:]
            else:
                lg = self.logits(x[:B], cond.cond_BD[:B]).mul(1 / taus[k])
            lg = lg.reshape(B, h * w * d, 2)
            if keep_logits:
                logits_out.append(lg.reshape(B, h * w, d, 2).clone())
            bits = sample_bits(lg, top_k, top_p, generator).view(B, h, w, d).to(torch.uint8)
            bits_out.append(bits)
            codes_up = bilinear_resize(bits_to_codes(bits), (hK, wK))
            if on_scale is not None:
                codes_up = on_scale(k, codes_up)
                if tuple(codes_up.shape) != (B, d, hK, wK):
                    raise ValueError(f"`on_scale` must return ({B}, {d}, {hK}, {wK}) codes, got {tuple(codes_up.shape)}")
            # Start from the first scale's codes (not zeros + codes) so the sum keeps their memory layout: the CPU
            # resize kernels round differently for channels-last and contiguous tensors.
            acc = codes_up.float() if acc is None else acc + codes_up.float()
            if k < K - 1:
                x = self.embed_tokens(next_scale_input(acc, sched, k)).repeat(rows // B, 1, 1)
        return GenerationOutput(summed_codes=acc, bits=bits_out, logits=logits_out if keep_logits else None)


def _per_scale(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) < n:
        raise ValueError(f"`{name}` lists {len(values)} values for {n} scales")
    return values[:n]
