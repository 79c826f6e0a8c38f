"""Reading the noisy chain back out of bitwise self-correction's outputs, for property tests.

Bitwise self-correction (docs/method.md, "Settings": self-correction strength and scales) returns only labels and next-scale inputs; the
flipped codes that produced the inputs are not returned. They are recovered here from the inputs themselves: the
input of scale k+1 is the running sum of the upsampled codes of scales <= k resized to scale k+1's grid, which is
linear in scale k's codes, so subtracting the resized sum of the earlier (already recovered) codes leaves a linear
image of scale k's codes; solving that least-squares system and taking signs gives scale k's codes (each is +-c).
Nothing here draws random numbers or repeats the flip rule: the recovered codes are whatever the inputs encode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from editinfinity.models.quantizer import area_resize, bilinear_resize, scale_codes_on_grid


@dataclass
class NoisyChain:
    noisy_bits: list[torch.Tensor]  # per scale 0..K-2 (B, h, w, d) uint8: the bits whose codes fed later scales
    expected_labels: list[torch.Tensor]  # per scale 0..K-1 (B, h, w, d) uint8: signs of the residual of the noisy sum
    labels: list[torch.Tensor]  # per scale 0..K-1 (B, h, w, d) uint8: the labels that were returned


def _grids(schedule) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for _, h, w in schedule]


@functools.cache
def _inverse_map(grid_k, grid_next, last) -> torch.Tensor:
    """(n_k, n_next): the pseudo-inverse of the linear map from one channel of scale k's codes to their
    contribution to scale k+1's input (checked to be injective, so the codes are determined by the input)."""
    n = grid_k[0] * grid_k[1]
    basis = torch.eye(n).reshape(1, n, *grid_k)  # channel i = unit code at cell i
    m = bilinear_resize(bilinear_resize(basis, last), grid_next).reshape(n, -1).T.double()
    assert torch.linalg.matrix_rank(m) == n, f"codes on {grid_k} are not recoverable from inputs on {grid_next}"
    return torch.linalg.pinv(m)


def split_inputs(x_wo_prefix: torch.Tensor, schedule) -> list[torch.Tensor]:
    """(B, L-1, d) -> per scale 1..K-1 (B, d, h, w)."""
    grids = _grids(schedule)
    out, start = [], 0
    for h, w in grids[1:]:
        block = x_wo_prefix[:, start:start + h * w]
        out.append(block.transpose(1, 2).reshape(x_wo_prefix.shape[0], -1, h, w))
        start += h * w
    assert start == x_wo_prefix.shape[1], "inputs do not match the schedule"
    return out


def split_labels(gt_bits: torch.Tensor, schedule) -> list[torch.Tensor]:
    """(B, L, d) -> per scale (B, h, w, d)."""
    out, start = [], 0
    for h, w in _grids(schedule):
        out.append(gt_bits[:, start:start + h * w].reshape(gt_bits.shape[0], h, w, -1))
        start += h * w
    assert start == gt_bits.shape[1], "labels do not match the schedule"
    return out


def read_noisy_chain(z: torch.Tensor, schedule, gt_bits: torch.Tensor, x_wo_prefix: torch.Tensor) -> NoisyChain:
    """Recover the codes that fed each scale's input and the labels they imply (see the module docstring)."""
    grids = _grids(schedule)
    last = grids[-1]
    z = z.float()
    b, d = z.shape[:2]
    inputs = split_inputs(x_wo_prefix.float(), schedule)
    acc = torch.zeros_like(z)
    noisy, expected = [], []
    for k, grid in enumerate(grids):
        residual = z - acc
        if k < len(grids) - 1:
            residual = area_resize(residual, grid)
        expected.append((residual > 0).permute(0, 2, 3, 1).to(torch.uint8).contiguous())
        if k == len(grids) - 1:
            break
        nxt = grids[k + 1]
        diff = inputs[k] - bilinear_resize(acc, nxt)  # (B, d, h', w')
        codes = _inverse_map(grid, nxt, last) @ diff.reshape(b * d, -1).T.double()  # (n_k, B*d)
        bits = (codes.T.reshape(b, d, *grid) > 0).permute(0, 2, 3, 1).to(torch.uint8).contiguous()
        noisy.append(bits)
        acc = acc + scale_codes_on_grid([bits], [schedule[k], schedule[-1]])[0]  # upsampled to the last grid
    return NoisyChain(noisy_bits=noisy, expected_labels=expected, labels=split_labels(gt_bits, schedule))


def flip_fractions(chain: NoisyChain) -> list[float]:
    """Per scale 0..K-2: the share of bits whose fed code differs from the label."""
    return [float((n != lab).float().mean()) for n, lab in zip(chain.noisy_bits, chain.labels[:-1], strict=True)]
