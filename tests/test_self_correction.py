"""Bitwise self-correction with the noise on, as properties of its outputs (docs/method.md, "Settings": the
self-correction rows): the labels are the signs of the residual left by the *noisy* codes, flips stop at
``noise_layers``, and the flip rate follows the strength. The noisy codes are read back from the inputs
(tests/selfcorrection.py), so nothing here repeats the random draws."""

from __future__ import annotations

import math

import pytest
import torch

from editinfinity.models.quantizer import bitwise_self_correction, multiscale_quantize
from editinfinity.models.schedules import get_schedule
from selfcorrection import flip_fractions, read_noisy_chain

SCHEDULES = {"square_0.06M": get_schedule(1.0, "0.06M"), "ratio0.75_0.06M": get_schedule(0.75, "0.06M")}


def _latent(schedule, batch, seed, d=32) -> torch.Tensor:
    _, h, w = schedule[-1]
    return torch.randn(batch, d, h, w, generator=torch.Generator().manual_seed(seed))


def test_reading_the_chain_back_recovers_the_clean_codes_without_noise():
    """The reader itself: on clean inputs it finds the clean bits (so a flip it reports is in the inputs)."""
    schedule = SCHEDULES["square_0.06M"]
    z = _latent(schedule, 2, 0)
    clean = multiscale_quantize(z, schedule)
    chain = read_noisy_chain(z, schedule, clean.gt_bits, clean.x_wo_prefix)
    assert all(torch.equal(n, b) for n, b in zip(chain.noisy_bits, clean.bits[:-1], strict=True))
    assert all(torch.equal(e, lab) for e, lab in zip(chain.expected_labels, chain.labels, strict=True))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("noise_layers", [None, 1, 3])
def test_labels_are_the_signs_of_the_residual_of_the_noisy_codes(name, noise_layers):
    schedule = SCHEDULES[name]
    layers = len(schedule) if noise_layers is None else noise_layers
    z = _latent(schedule, 2, 1)
    clean = multiscale_quantize(z, schedule)
    flipped_somewhere = False
    for seed in range(4):
        gt, x = bitwise_self_correction(z, schedule, layers, 0.3, torch.Generator().manual_seed(seed))
        chain = read_noisy_chain(z, schedule, gt, x)
        for k, (expected, label) in enumerate(zip(chain.expected_labels, chain.labels, strict=True)):
            assert torch.equal(label, expected), f"seed {seed}: labels of scale {k} are not the noisy chain's"
        fractions = flip_fractions(chain)
        assert all(f == 0.0 for f in fractions[layers:]), f"flips at or beyond noise_layers={layers}: {fractions}"
        flipped_somewhere |= any(f > 0 for f in fractions)
    assert flipped_somewhere
    # and the noise really changed the labels of later scales (they are not the clean chain's)
    assert not torch.equal(gt, clean.gt_bits) or layers == 0


@pytest.mark.parametrize("noise_layers", [1, 2, 4])
def test_every_scale_below_noise_layers_flips_and_none_above(noise_layers):
    schedule = SCHEDULES["square_0.06M"]
    z = _latent(schedule, 1, 2)
    per_scale = torch.zeros(len(schedule) - 1)
    for seed in range(10):
        gt, x = bitwise_self_correction(z, schedule, noise_layers, 0.3, torch.Generator().manual_seed(seed))
        per_scale = torch.maximum(per_scale, torch.tensor(flip_fractions(read_noisy_chain(z, schedule, gt, x))))
    assert (per_scale[:noise_layers] > 0).all(), per_scale.tolist()
    assert (per_scale[noise_layers:] == 0).all(), per_scale.tolist()


@pytest.mark.parametrize("strength", [0.1, 0.3])
def test_flip_rate_matches_the_strength(strength):
    """Per scale p ~ U{0, 0.01, .., strength} and each bit flips with probability p: the mean flip share is
    strength / 2 (within 4 standard errors of this sample), none exceeds strength beyond binomial noise, and
    the per-scale shares spread over the range rather than sitting at one value."""
    schedule = SCHEDULES["square_0.06M"]
    z = _latent(schedule, 1, 3)
    shares = []
    for seed in range(40):
        gt, x = bitwise_self_correction(z, schedule, len(schedule), strength, torch.Generator().manual_seed(seed))
        shares += flip_fractions(read_noisy_chain(z, schedule, gt, x))
    t = torch.tensor(shares, dtype=torch.float64)
    se = float(t.std()) / math.sqrt(len(t))
    assert abs(float(t.mean()) - strength / 2) < 4 * se + 1e-3, (float(t.mean()), se)
    bits = z.shape[1]  # the smallest scale's bit count (1x1 grid, batch 1)
    assert float(t.max()) <= strength + 4 * math.sqrt(strength * (1 - strength) / bits)
    # a uniform p over {0..strength} has sd strength / sqrt(12); a constant p would have ~binomial spread only
    assert float(t.std()) > 0.6 * strength / math.sqrt(12)
