"""Scale schedules: aspect-ratio templates, pixel budgets, token counts and RoPE grid positions.

Every size in the project (latent grids, pixel sizes, sequence lengths, the RoPE table) derives from these
tables, never from hard-coded 1024x1024 / 64x64 / 10521 constants. A schedule is a list of ``(1, h, w)`` latent
grids, coarse to fine; one latent cell covers ``patch`` x ``patch`` pixels (16 for the d32 VAE).
"""

from __future__ import annotations

import math

import torch

Scale = tuple[int, int, int]
Schedule = list[Scale]

# Height/width ratio -> the 13 (h, w) grids of the 1M budget. Smaller budgets use a prefix.
_BASE_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}


def _register_transposed(base: dict[float, tuple[tuple[int, int], ...]]) -> dict[float, tuple[tuple[int, int], ...]]:
    out = dict(base)
    for ratio, grids in base.items():
        if ratio != 1.0:
            # The reference keys the transposed template by a *truncated* inverse (0.666, 0.571, 0.333).
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return out


TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _register_transposed(_BASE_TEMPLATES)

#: Pixel budget name -> number of scales (a prefix of the template's 13 grids).
BUDGETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

#: Pixels per latent cell of the d32 VAE.
PATCH = 16


def nearest_ratio(h_div_w: float) -> float:
    """The template key nearest (absolute difference) to an image's height / width."""
    if not (h_div_w > 0 and math.isfinite(h_div_w)):
        raise ValueError(f"`h_div_w` must be a positive finite number, got {h_div_w!r}")
    return min(TEMPLATES, key=lambda r: abs(r - h_div_w))


def get_schedule(h_div_w: float, budget: str = "1M") -> Schedule:
    """The scale schedule of the template nearest to ``h_div_w`` at pixel budget ``budget``."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown pixel budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    grids = TEMPLATES[nearest_ratio(h_div_w)][: BUDGETS[budget]]
    return [(1, h, w) for h, w in grids]


def normalize_schedule(schedule) -> Schedule:
    """Accept a list of (h, w) / (t, h, w) tuples or an int tensor and return ``[(1, h, w), ...]``."""
    if isinstance(schedule, torch.Tensor):
        schedule = schedule.tolist()
    out = []
    for s in schedule:
        s = tuple(int(v) for v in s)
        out.append((1, s[-2], s[-1]))
    return out


def template_of(schedule) -> float:
    """The template key whose grids start with ``schedule`` (raises if the schedule is not a template prefix)."""
    grids = [(h, w) for _, h, w in normalize_schedule(schedule)]
    for ratio, tmpl in TEMPLATES.items():
        if list(tmpl[: len(grids)]) == grids:
            return ratio
    raise ValueError(f"schedule {grids} is not a prefix of any aspect template; build it with get_schedule()")


def full_schedule(schedule) -> Schedule:
    """The 13-scale (1M) schedule of the same template; RoPE positions are normalised to its last grid."""
    return [(1, h, w) for h, w in TEMPLATES[template_of(schedule)]]


def last_grid(schedule) -> tuple[int, int]:
    """(h_K, w_K): the final latent grid, where masks and weight maps live."""
    _, h, w = normalize_schedule(schedule)[-1]
    return h, w


def pixel_size(schedule, patch: int = PATCH) -> tuple[int, int]:
    """(H, W) in pixels of an image whose latent grid is the schedule's last grid."""
    h, w = last_grid(schedule)
    return h * patch, w * patch


def num_tokens(schedule) -> int:
    """Sequence length L = sum of h_k * w_k (includes the 1x1 start scale)."""
    return sum(h * w for _, h, w in normalize_schedule(schedule))


def scale_lengths(schedule) -> list[int]:
    return [h * w for _, h, w in normalize_schedule(schedule)]


def scale_offsets(schedule) -> list[int]:
    """Start index of every scale in the flattened sequence, plus the total length at the end."""
    offs = [0]
    for n in scale_lengths(schedule):
        offs.append(offs[-1] + n)
    return offs


def scale_index_per_token(schedule) -> torch.Tensor:
    """(L,) int64: the scale of every token."""
    return torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(scale_lengths(schedule))])


def rope_positions(schedule) -> torch.Tensor:
    """(L, 2) int64 grid positions (row, col) of every token, RoPE mode 2 (``rope2d_normalized_by_hw=2``).

    A token at cell (i, j) of an h x w scale sits at ``round(i * H/h), round(j * W/w)`` where (H, W) is the
    last grid of the template's 1M schedule, computed in float32 and rounded half to even as the reference does.
    """
    big_h, big_w = last_grid(full_schedule(schedule))
    rows = []
    for _, h, w in normalize_schedule(schedule):
        i = torch.arange(h, dtype=torch.float32) * torch.tensor(big_h / h, dtype=torch.float32)
        j = torch.arange(w, dtype=torch.float32) * torch.tensor(big_w / w, dtype=torch.float32)
        r, c = torch.meshgrid(torch.round(i).long(), torch.round(j).long(), indexing="ij")
        rows.append(torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1))
    return torch.cat(rows, dim=0)


def loss_weights(schedule) -> torch.Tensor:
    """(L,) float64 per-token loss weights: sqrt(h_K w_K)/sqrt(h_k w_k), normalised to sum 1 (reweight_loss_by_scale)."""
    h_last, w_last = last_grid(schedule)
    w = torch.cat(
        [torch.full((h * w_,), math.sqrt(h_last * w_last) / math.sqrt(h * w_), dtype=torch.float64)
         for _, h, w_ in normalize_schedule(schedule)]
    )
    return w / w.sum()
