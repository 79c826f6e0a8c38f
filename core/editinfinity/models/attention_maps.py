"""Cross-attention maps of a target word, collected through the transformer's ``attention_probe`` hook."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import schedules


class AttentionMapCollector:
    """Cross-attention map of a token range, for the conditional sample (sample 0), on the last grid.

    Pass as ``attention_probe`` to a teacher-forced forward. Per block and scale: ``softmax(q k^T / sqrt(hd))``
    over sample 0's text rows, mean over the columns ``[start, end)``, mean over heads, reshaped to (h_k, w_k)
    and resized bilinearly (align_corners=False) to (hK, wK). :meth:`result` is the mean of all those maps.

    ``keep_maps``: also keep every (layer, scale) map before resizing in :attr:`maps`, as
    ``(layer_index, scale_index, (h_k, w_k) map)`` in call order (to localise a difference in the mean map).
    """

    def __init__(self, token_range: tuple[int, int], schedule, keep_maps: bool = False):
        self.start, self.end = (int(v) for v in token_range)
        if not 0 <= self.start < self.end:
            raise ValueError(f"`token_range` must be (start, end) with 0 <= start < end, got {tuple(token_range)}")
        self.schedule = schedules.normalize_schedule(schedule)
        self.grid = schedules.last_grid(self.schedule)
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.maps: list[tuple[int, int, torch.Tensor]] | None = [] if keep_maps else None

    @torch.no_grad()
    def __call__(self, layer_index: int, q_LHc: torch.Tensor, k_THc: torch.Tensor) -> None:
        L = schedules.num_tokens(self.schedule)
        if q_LHc.shape[0] != L:
            raise ValueError(f"collector built for {L} tokens, got queries for {q_LHc.shape[0]}")
        if self.end > k_THc.shape[0]:
            raise ValueError(f"token range [{self.start}, {self.end}) exceeds the {k_THc.shape[0]} text rows")
        q, k = q_LHc.float().transpose(0, 1), k_THc.float().transpose(0, 1)  # (H, L, hd), (H, T, hd)
        scale = 1.0 / math.sqrt(q.shape[-1])
        end = 0
        for si, (_, h, w) in enumerate(self.schedule):
            start, end = end, end + h * w
            attn = torch.softmax(torch.matmul(q[:, start:end], k.transpose(-2, -1)) * scale, dim=-1)  # (H, n, T)
            m = attn[:, :, self.start:self.end].mean(dim=-1).mean(dim=0).view(1, 1, h, w)
            if self.maps is not None:
                self.maps.append((int(layer_index), si, m[0, 0].clone()))
            m = F.interpolate(m, size=self.grid, mode="bilinear", align_corners=False)[0, 0]
            self._sum = m if self._sum is None else self._sum + m
            self._count += 1

    @property
    def count(self) -> int:
        """Number of (layer, scale) maps collected."""
        return self._count

    def result(self) -> torch.Tensor:
        """(hK, wK) float32 mean map."""
        if self._sum is None:
            raise RuntimeError("no attention collected: pass the collector as `attention_probe` to a forward pass")
        return self._sum / self._count
