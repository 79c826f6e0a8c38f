"""Building blocks of the Infinity transformer: text pooling, attention, FFN and the shared-AdaLN block.

Module and parameter names equal the official checkpoint's (``sa.mat_qkv``, ``ca.mat_kv``, ``ada_gss``, ...).
Precision: norms, AdaLN modulation, q/k normalisation and RoPE run in float32 whatever the autocast state;
matmuls follow autocast (bf16 on GPU). All attention goes through ``scaled_dot_product_attention``.

Bias mode (``"upstream"`` / ``"editinfinity"``): upstream Infinity adds ``q_bias``/``v_bias`` to the self-attention
projections and ``v_bias`` to every cross-attention (and the text pool) value projection; EditInfinity's code
computes those projections without them. The parameters exist (and load) in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

BIAS_MODES = ("upstream", "editinfinity")

#: Called by cross-attention for the conditional sample: ``probe(layer_index, q_LHc, k_THc)``. A probe with a true
#: ``batched`` attribute gets the whole batch instead: ``probe(layer_index, q_BLHc, k_BTHc, attn_mask)``.
AttentionProbe = Callable[[int, torch.Tensor, torch.Tensor], None]


def check_bias_mode(mode: str) -> str:
    if mode not in BIAS_MODES:
        raise ValueError(f"`bias_mode` must be one of {', '.join(BIAS_MODES)}, got {mode!r}")
    return mode


def layer_norm32(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine over the last dim, in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def key_padding_mask(mask: torch.Tensor | None, lens: Sequence[int] | None = None) -> torch.Tensor | None:
    """(B, T) bool (True = real row) -> (B, 1, 1, T) for SDPA; None when nothing is padded (keeps flash usable).

    ``lens`` (rows per sample, when known) decides that on the host, without reading the mask back from the device.
    """
    if mask is None:
        return None
    if (min(lens) == max(lens)) if lens is not None else bool(mask.all()):
        return None
    return mask[:, None, None, :]


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, cast back to the input dtype (the text norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight.float()
        return out.to(x.dtype)


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (the LoRA targets)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class KVCache:
    """Rotated keys and values of the scales seen so far, for one self-attention layer (inference only)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    """Cosine self-attention with a per-head temperature and 2D RoPE; softmax scale 1.

    Teacher forcing (``segments`` = tokens per scale) is block-causal: the queries of scale k attend the keys of
    scales <= k, one SDPA call per scale, no mask. With a ``cache`` the new tokens attend everything cached.
    """

    max_log_scale = math.log(100.0)

    def __init__(self, dim: int, num_heads: int, bias_mode: str = "upstream"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.bias_mode = check_bias_mode(bias_mode)
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, C = x.shape
        qkv = self.mat_qkv(x)
        if self.bias_mode == "upstream":
            qkv = qkv + torch.cat([self.q_bias, self.zero_k_bias, self.v_bias]).to(qkv.dtype)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each BHLc
        with torch.autocast(device_type=x.device.type, enabled=False):
            temperature = self.scale_mul_1H11.float().clamp_max(self.max_log_scale).exp()
            q = F.normalize(q.float(), dim=-1, eps=1e-12).mul(temperature)
            k = F.normalize(k.float(), dim=-1, eps=1e-12)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x: torch.Tensor, rope: torch.Tensor, segments: Sequence[int] | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``x`` (B, L, C); ``rope`` (2, L, hd/2) for these tokens; exactly one of ``segments`` / ``cache``."""
        B, L, C = x.shape
        q, k, v = self._qkv(x, rope)
        if cache is not None:
            k, v = cache.extend(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            if segments is None or sum(segments) != L:
                raise ValueError(f"`segments` must split the {L} tokens into scales, got {segments}")
            outs, end = [], 0
            for n in segments:
                start, end = end, end + n
                outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=1.0))
            out = torch.cat(outs, dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Attention from image tokens to the sample's own text rows (padded + masked); scale 1/sqrt(hd)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, bias_mode: str = "upstream"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.bias_mode = check_bias_mode(bias_mode)
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, Ckv) -> k, v each (B, T, H, hd)."""
        B, T, _ = memory.shape
        kv = self.mat_kv(memory)
        if self.bias_mode == "upstream":
            kv = kv + torch.cat([self.zero_k_bias, self.v_bias]).to(kv.dtype)
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).unbind(2)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None,
                probe: AttentionProbe | None = None, layer_index: int = 0) -> torch.Tensor:
        """``x`` (B, L, C) already normalised; ``memory`` (B, T, D); ``attn_mask`` from :func:`key_padding_mask`."""
        B, L, C = x.shape
        q = self.mat_q(x).view(B, L, self.num_heads, self.head_dim)
        k, v = self.keys_values(memory)
        if probe is not None:
            if getattr(probe, "batched", False):  # e.g. a training loss on the maps: every sample, with gradients
                probe(layer_index, q, k, attn_mask)
            else:
                n0 = int(attn_mask[0].sum()) if attn_mask is not None else k.shape[1]
                probe(layer_index, q[0], k[0, :n0])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class PoolAttention(nn.Module):
    """One learned query per head attending over each sample's text rows (``text_proj_for_sos.ca``)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, bias_mode: str = "upstream"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.bias_mode = check_bias_mode(bias_mode)
        self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, rows: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """``rows`` (B, T, Ct5) normalised text, ``attn_mask`` from :func:`key_padding_mask` -> pooled (B, D)."""
        B, T, _ = rows.shape
        kv = self.mat_kv(rows)
        if self.bias_mode == "upstream":
            kv = kv + torch.cat([self.zero_k_bias, self.v_bias]).to(kv.dtype)
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).unbind(2)
        q = self.mat_q.to(k.dtype).expand(B, -1, -1).unsqueeze(2)  # (B, H, 1, hd)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(out.reshape(B, -1))


class TextAttentivePool(nn.Module):
    """Pooled text condition: ``128``-wide heads over the T5 width (64 when the model is wider than 4096)."""

    def __init__(self, text_channels: int, dim: int, bias_mode: str = "upstream"):
        super().__init__()
        pool_head = 128 if dim <= 4096 else 64
        heads = text_channels // pool_head
        if heads < 1 or text_channels % pool_head or dim % heads:
            raise ValueError(f"`text_channels` ({text_channels}) must be a multiple of {pool_head} and the width "
                             f"({dim}) divisible by its {heads} pool heads")
        self.ca = PoolAttention(dim, text_channels, heads, bias_mode)

    def forward(self, rows: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.ca(rows, attn_mask)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm (no affine) modulated by ``(scale, shift) = ada_lin(cond)``, float32."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            scale, shift = self.ada_lin(cond_BD.float()).view(cond_BD.shape[0], 1, 2, -1).unbind(2)
            return layer_norm32(x, self.eps).mul(scale.add(1)).add_(shift)


class CrossAttnBlock(nn.Module):
    """Pre-norm block: AdaLN self-attention -> cross-attention (ungated) -> AdaLN FFN.

    Shared AdaLN: ``(g1, g2, s1, s2, b1, b2) = ada_gss + gss``; modulation is ``LN(x) * (1 + s) + b`` and the
    branch output is multiplied by ``g``. ``attn_mask`` masks padded text rows (:func:`key_padding_mask`);
    ``keep`` (2, B) holds this block's DropPath sample scales (train only).
    """

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, text_dim: int, eps: float, bias_mode: str):
        super().__init__()
        self.eps = eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        self.sa = SelfAttention(dim, num_heads, bias_mode)
        self.ca = CrossAttention(dim, text_dim, num_heads, bias_mode)
        self.ffn = FFN(dim, ffn_hidden)
        self.ca_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, gss: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None,
                rope: torch.Tensor, segments: Sequence[int] | None = None, cache: KVCache | None = None,
                keep: torch.Tensor | None = None, probe: AttentionProbe | None = None,
                layer_index: int = 0) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            g1, g2, s1, s2, b1, b2 = (self.ada_gss.float() + gss.float()).unbind(2)  # each (B, 1, C)
            h = layer_norm32(x, self.eps).mul(s1.add(1)).add_(b1)
        a = self.sa(h, rope, segments=segments, cache=cache)
        a = (a.float() * g1).to(a.dtype)  # the reference gates the attention output in place: rounding stays in its dtype
        x = x + _drop_path(a, None if keep is None else keep[0])
        x = x + self.ca(self.ca_norm(x), memory, attn_mask, probe, layer_index).float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = layer_norm32(x, self.eps).mul(s2.add(1)).add_(b2)
        f = self.ffn(h).mul(g2)
        return x + _drop_path(f, None if keep is None else keep[1])


def _drop_path(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * keep.to(x.dtype).view(-1, 1, 1)


def drop_path_scales(rate: float, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(2, B) per-sample stochastic-depth factors of one block (SA branch, FFN branch): 0 or 1/(1-rate)."""
    keep = 1.0 - rate
    draws = torch.rand(2, batch, generator=generator, device=generator.device if generator is not None else "cpu")
    return ((draws < keep).float() / keep).to(device)
