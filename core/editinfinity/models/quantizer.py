"""Bitwise multi-scale residual quantisation (BSQ) of VAE latents, as pure tensor functions.

A latent ``z`` of shape ``(B, d, h_K, w_K)`` is coded scale by scale: the residual left by the codes of the earlier
scales is average-pooled to the scale's grid and every token's d-vector becomes d bits (bit = component > 0). A bit
stands for the code component ``+c`` (1) or ``-c`` (0) with ``c = 1/sqrt(d)`` (see :func:`code_scale`). Codes are
upsampled bilinearly to the final grid and summed; the transformer's next-scale input is that running sum resized
bilinearly to the next grid.

Conventions: bits are ``uint8`` ``(B, h, w, d)`` (channels last, as token rows); codes and latents are float32
``(B, d, h, w)``; schedules are lists of ``(1, h, w)`` (see :mod:`editinfinity.models.schedules`). Everything runs
in float32 with autocast disabled, because a bit is a sign and bf16 rounding flips the signs of small residuals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F

from editinfinity.models.schedules import Schedule, normalize_schedule

__all__ = [
    "MultiScaleCodes",
    "area_resize",
    "bilinear_resize",
    "bits_to_codes",
    "bitwise_self_correction",
    "bsq_quantize",
    "code_scale",
    "inputs_from_bits",
    "multiscale_quantize",
    "next_scale_input",
    "scale_codes_on_grid",
]


@dataclass
class MultiScaleCodes:
    """The multi-scale bit codes of a batch of latents.

    ``bits``: per scale ``(B, h_k, w_k, d)`` uint8; ``summed_codes``: ``(B, d, h_K, w_K)`` sum over scales of the
    upsampled codes (exactly what :func:`scale_codes_on_grid` rebuilds from ``bits``); ``x_wo_prefix``:
    ``(B, L-1, d)`` teacher-forcing inputs of scales 1..K-1; ``gt_bits``: ``(B, L, d)`` uint8 labels;
    ``raw_features``: the unquantised latent when the codes came from :meth:`BSQVAE.encode` (training with bitwise
    self-correction re-quantises it), else ``None``.
    """

    bits: list[torch.Tensor]
    summed_codes: torch.Tensor
    x_wo_prefix: torch.Tensor
    gt_bits: torch.Tensor
    raw_features: torch.Tensor | None = field(default=None)

    @property
    def schedule(self) -> Schedule:
        """The scale schedule the bits were made with."""
        return [(1, int(b.shape[1]), int(b.shape[2])) for b in self.bits]

    def to(self, device: torch.device | str) -> MultiScaleCodes:
        """A copy with every tensor moved to ``device``."""
        raw = None if self.raw_features is None else self.raw_features.to(device)
        return MultiScaleCodes(
            bits=[b.to(device) for b in self.bits],
            summed_codes=self.summed_codes.to(device),
            x_wo_prefix=self.x_wo_prefix.to(device),
            gt_bits=self.gt_bits.to(device),
            raw_features=raw,
        )


def _autocast_off(device: torch.device) -> AbstractContextManager:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _size2(size: Sequence[int]) -> tuple[int, int]:
    """Accept ``(h, w)`` or ``(t, h, w)`` (schedule entries) and return ``(h, w)``."""
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3) or (len(size) == 3 and size[0] != 1):
        raise ValueError(f"size must be (h, w) or (1, h, w), got {size}")
    return size[-2], size[-1]


def _check_latent(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"`{name}` must be (B, d, h, w), got shape {tuple(x.shape)}")
    return x.float()


def _singleton_time_kernels(device: torch.device) -> bool:
    # The reference resizes (B, d, 1, h, w) tensors with the 3-D kernels; on CPU the 2-D bilinear kernel rounds
    # differently (a few ulp), and the parity fixtures are bit-exact, so the same 3-D kernels are used where they exist.
    return device.type in ("cpu", "cuda")


def _upsample_codes(codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Codes ``(B, d, h, w)`` resized bilinearly to ``grid``, contiguous.

    The reference's codes are a channels-last view of its (B, 1, h, w, d) bit layout, and the CPU interpolation
    kernel for that layout rounds differently from the contiguous one; resizing from the same layout makes the
    per-scale codes and their sums bit-identical to the reference's.
    """
    codes = codes.contiguous(memory_format=torch.channels_last)
    return bilinear_resize(codes, grid).contiguous()


@cache
def _code_scale_value(d: int) -> float:
    # The reference builds codes as +-fl32(1/sqrt(d)) and then l2-normalises them in float32; for d = 32 that
    # normalisation moves the value one ulp up (0.17677670717... instead of 0.17677669227...). Every code vector
    # has the same norm whatever its bits, so the normalised magnitude is one constant.
    v = torch.full((1, d), 1.0 / math.sqrt(d), dtype=torch.float32)
    return float(F.normalize(v, dim=-1)[0, 0])


def code_scale(d: int) -> float:
    """Magnitude ``c`` of every code component for ``d`` bits: ``1/sqrt(d)`` as the reference computes it in float32.

    ``c`` is a float32 value within float32 rounding of ``1/sqrt(d)`` (for d = 32 one ulp above the nearest float32).
    """
    if d <= 0:
        raise ValueError(f"codebook dimension must be positive, got {d}")
    return _code_scale_value(int(d))


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Codes ``(B, d, h, w)`` float32 of bits ``(B, h, w, d)``: bit 1 -> ``+c``, bit 0 -> ``-c`` (``c = code_scale(d)``).

    The result is a channels-last view of the bit layout, as the reference's codes are: CPU interpolation rounds
    differently per memory layout, and keeping this one makes resized codes bit-identical to the reference's.
    Use ``.reshape``/``.contiguous()`` rather than ``.view`` on it.
    """
    if bits.ndim != 4:
        raise ValueError(f"bits must be (B, h, w, d), got shape {tuple(bits.shape)}")
    c = code_scale(bits.shape[-1])
    pos = torch.tensor(c, dtype=torch.float32, device=bits.device)
    return torch.where(bits.bool(), pos, -pos).permute(0, 3, 1, 2)


def area_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of ``(B, C, h, w)`` to ``size``; identity when the size is unchanged.

    Output cell i averages input cells ``[floor(i*In/Out), ceil((i+1)*In/Out))`` (windows overlap for non-integer
    ratios), which is ``F.interpolate(mode='area')``.
    """
    x = _check_latent(x, "x")
    h, w = _size2(size)
    if tuple(x.shape[-2:]) == (h, w):
        return x
    with _autocast_off(x.device):
        if _singleton_time_kernels(x.device):
            return F.adaptive_avg_pool3d(x.unsqueeze(2), (1, h, w)).squeeze(2)
        return F.adaptive_avg_pool2d(x, (h, w))


def bilinear_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size`` (align_corners=False, no antialias); identity when unchanged.

    Used both to upsample codes and to *downsample* the running code sum (point sampling, e.g. 64 -> 2 samples
    the pairs around 15.5 and 47.5). The output keeps the input's memory layout (see :func:`bits_to_codes`).
    """
    x = _check_latent(x, "x")
    h, w = _size2(size)
    if tuple(x.shape[-2:]) == (h, w):
        return x
    with _autocast_off(x.device):
        if _singleton_time_kernels(x.device):
            # Trilinear with a depth of 1 -> 1 is bilinear; see _singleton_time_kernels for why it is used.
            out = F.interpolate(x.unsqueeze(2), size=(1, h, w), mode="trilinear", align_corners=False)
            return out.squeeze(2)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)


def bsq_quantize(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a residual ``(B, d, h, w)``: returns ``(codes (B, d, h, w) float32, bits (B, h, w, d) uint8)``.

    A bit is 1 iff the token's l2-normalised component is > 0 (an exact zero gives 0). Codes are exactly ``+-c``;
    when ``r`` needs a gradient they carry a straight-through gradient to the normalised residual (forward value
    unchanged, as ``u - u.detach()`` is exactly zero).
    """
    r = _check_latent(r, "r")
    with _autocast_off(r.device):
        u = F.normalize(r, dim=1, eps=1e-12)
        bits = (u > 0).permute(0, 2, 3, 1).to(torch.uint8).contiguous()
        codes = bits_to_codes(bits)
        if torch.is_grad_enabled() and u.requires_grad:
            codes = codes + (u - u.detach())
    return codes, bits


def _grids(schedule) -> list[tuple[int, int]]:
    grids = [(h, w) for _, h, w in normalize_schedule(schedule)]
    if not grids:
        raise ValueError("the scale schedule is empty")
    return grids


def _check_grid(z: torch.Tensor, grids: list[tuple[int, int]]) -> None:
    if tuple(z.shape[-2:]) != grids[-1]:
        raise ValueError(
            f"latent grid {tuple(z.shape[-2:])} does not match the schedule's last grid {grids[-1]}; "
            "choose the schedule from the image size (schedules.get_schedule) or resize the image"
        )


def _check_bits(bits_list: Sequence[torch.Tensor], grids: list[tuple[int, int]]) -> None:
    if len(bits_list) > len(grids):
        raise ValueError(f"{len(bits_list)} bit tensors for a schedule of {len(grids)} scales")
    for k, b in enumerate(bits_list):
        if b.ndim != 4 or tuple(b.shape[1:3]) != grids[k]:
            raise ValueError(f"bits of scale {k} must be (B, {grids[k][0]}, {grids[k][1]}, d), got {tuple(b.shape)}")


def next_scale_input(acc: torch.Tensor, schedule, k: int) -> torch.Tensor:
    """Transformer input for scale ``k+1``: the running code sum ``acc (B, d, h_K, w_K)`` (codes of scales <= k)
    resized bilinearly to scale k+1's grid and flattened row-major -> ``(B, h_{k+1} * w_{k+1}, d)``."""
    grids = _grids(schedule)
    if not 0 <= k < len(grids) - 1:
        raise ValueError(f"scale index k={k} has no next scale in a schedule of {len(grids)} scales")
    acc = _check_latent(acc, "acc")
    x = bilinear_resize(acc, grids[k + 1])
    return x.flatten(2).transpose(1, 2).contiguous()


def scale_codes_on_grid(bits_list: Sequence[torch.Tensor], schedule) -> list[torch.Tensor]:
    """Per scale, the codes of its bits upsampled to the last grid: ``S_k`` ``(B, d, h_K, w_K)`` (EditInfinity's
    ``each_scale_code_k``). ``bits_list`` may hold the first few scales only."""
    grids = _grids(schedule)
    _check_bits(bits_list, grids)
    return [_upsample_codes(bits_to_codes(b), grids[-1]) for b in bits_list]


def inputs_from_bits(bits_list: Sequence[torch.Tensor], schedule) -> torch.Tensor:
    """Teacher-forcing inputs ``x_wo_prefix (B, L-1, d)`` rebuilt from the bits of (at least) scales 0..K-2."""
    grids = _grids(schedule)
    _check_bits(bits_list, grids)
    if not bits_list or len(bits_list) < len(grids) - 1:
        raise ValueError(f"need the bits of {max(len(grids) - 1, 1)} scale(s), got {len(bits_list)}")
    sched = _as_schedule(grids)
    acc = None
    inputs = []
    for k in range(len(grids) - 1):
        up = _upsample_codes(bits_to_codes(bits_list[k]), grids[-1])
        acc = up if acc is None else acc + up
        inputs.append(next_scale_input(acc, sched, k))
    if not inputs:  # a one-scale schedule has no inputs beyond the start token
        first = bits_list[0]
        return torch.zeros(first.shape[0], 0, first.shape[-1], device=first.device)
    return torch.cat(inputs, dim=1)


def _as_schedule(grids: Sequence[tuple[int, int]]) -> Schedule:
    return [(1, int(h), int(w)) for h, w in grids]


# A flip callback gets (scale index, clean bits) and returns the bits whose codes feed later scales (or None).
_FlipFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def _residual_quantize(z: torch.Tensor, schedule, flip: _FlipFn | None):
    grids = _grids(schedule)
    z = _check_latent(z, "z").contiguous()
    _check_grid(z, grids)
    sched = _as_schedule(grids)
    last = len(grids) - 1
    bits_list: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    acc = torch.zeros_like(z)
    with _autocast_off(z.device):
        for k, grid in enumerate(grids):
            # Residual against the running sum (not an iterated subtraction) so labels and inputs agree with
            # bitwise self-correction exactly; the last scale is never resized.
            residual = z - acc.detach()
            if k < last:
                residual = area_resize(residual, grid)
            codes, bits = bsq_quantize(residual)
            bits_list.append(bits)
            if flip is not None:
                noisy = flip(k, bits)
                if noisy is not None:
                    codes = bits_to_codes(noisy)
            acc = acc + _upsample_codes(codes, grids[-1])
            if k < last:
                inputs.append(next_scale_input(acc, sched, k))
    b, d = z.shape[0], z.shape[1]
    x_wo_prefix = torch.cat(inputs, dim=1) if inputs else z.new_zeros(b, 0, d)
    gt_bits = torch.cat([bits.reshape(b, -1, d) for bits in bits_list], dim=1)
    return bits_list, acc, x_wo_prefix, gt_bits


def multiscale_quantize(z: torch.Tensor, schedule) -> MultiScaleCodes:
    """Multi-scale residual quantisation of a latent ``z (B, d, h_K, w_K)`` with ``schedule`` (last grid = z's grid)."""
    bits_list, summed, x_wo_prefix, gt_bits = _residual_quantize(z, schedule, flip=None)
    return MultiScaleCodes(bits=bits_list, summed_codes=summed, x_wo_prefix=x_wo_prefix, gt_bits=gt_bits)


def bitwise_self_correction(
    z: torch.Tensor,
    schedule,
    noise_layers: int,
    strength: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training inputs with bitwise self-correction: ``(gt_bits (B, L, d) uint8, x_wo_prefix (B, L-1, d))``.

    For each scale k < ``noise_layers`` a flip probability ``p = randint(0, 100*strength) / 100`` (inclusive) is
    drawn, then every bit flips independently with probability p; the flipped codes feed the later scales' residuals
    and inputs while the labels stay the clean bits of each residual. ``noise_layers <= 0`` (or strength 0) gives
    the clean inputs of :func:`multiscale_quantize`. Both draws come from ``generator`` (global RNG when None).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"`strength` must be in [0, 1], got {strength}")
    if noise_layers <= 0:
        _, _, x_wo_prefix, gt_bits = _residual_quantize(z, schedule, flip=None)
        return gt_bits, x_wo_prefix
    levels = int(round(100 * strength))
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def flip(k: int, bits: torch.Tensor) -> torch.Tensor | None:
        if k >= noise_layers:
            return None
        # p stays a tensor on the generator's device (no host sync per scale); float32 k / 100 equals the float32
        # rounding of the decimal k / 100 for every k in 0..100, so the comparison is the one with a Python float.
        p = torch.randint(0, levels + 1, (1,), generator=generator, device=gen_device).to(torch.float32) / 100
        # The mask is always drawn so the random stream does not depend on the drawn p.
        mask = torch.rand(bits.shape, generator=generator, device=gen_device) < p
        return bits ^ mask.to(device=bits.device, dtype=torch.uint8)

    _, _, x_wo_prefix, gt_bits = _residual_quantize(z, schedule, flip=flip)
    return gt_bits, x_wo_prefix
