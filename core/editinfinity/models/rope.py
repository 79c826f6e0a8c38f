"""2D rotary position embedding of Infinity's self-attention (``rope2d_normalized_by_hw = 2``).

Each head has ``P = head_dim / 2`` rotation pairs (adjacent elements, GPT-J layout); the first ``P/2`` pairs rotate
by the token's grid row, the rest by its grid column, with ``theta_j = 1 / 10000^(2j / P)``. Grid positions come
from :func:`schedules.rope_positions` (normalised to the template's 1M last grid) and must fit the reference's
``rope_size x rope_size`` base table (128 = 2048 px / 16).
"""

from __future__ import annotations

import torch

from . import schedules


def inv_freq(head_dim: int) -> torch.Tensor:
    """(head_dim/4,) float32 frequencies, evaluated exactly as the reference evaluates them."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs `head_dim` divisible by 4, got {head_dim}")
    half = head_dim // 2
    return 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))


def rope_table(schedule, head_dim: int, rope_size: int = 128) -> torch.Tensor:
    """(2, L, head_dim/2) float32 ``[cos, sin]`` of every token's rotation angles, in sequence order."""
    pos = schedules.rope_positions(schedule)
    if int(pos.max()) >= rope_size:
        raise ValueError(f"schedule positions reach {int(pos.max())}, beyond the RoPE table size {rope_size}")
    freqs = inv_freq(head_dim)
    # Same products as the reference's torch.outer(arange(128).float(), inv_freq) table, gathered per token.
    angles = torch.cat([torch.outer(pos[:, 0].float(), freqs), torch.outer(pos[:, 1].float(), freqs)], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., L, head_dim) by ``table`` (2, L, head_dim/2); float32, autocast off."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        cos, sin = table[0].float(), table[1].float()
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1)
        return out.reshape(x.shape)
