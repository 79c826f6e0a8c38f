"""Properties of the multi-scale bit quantiser and the BSQ VAE wrapper (no fixtures needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from editinfinity.models.bsq_vae import BSQVAE, group_norm_groups
from editinfinity.models.quantizer import (
    area_resize,
    bilinear_resize,
    bits_to_codes,
    bitwise_self_correction,
    bsq_quantize,
    code_scale,
    inputs_from_bits,
    multiscale_quantize,
    next_scale_input,
    scale_codes_on_grid,
)
from editinfinity.models.schedules import get_schedule, num_tokens, scale_offsets

SCHEDULES = {"square_0.06M": get_schedule(1.0, "0.06M"), "ratio0.75_0.06M": get_schedule(0.75, "0.06M")}


def _latent(schedule, batch=2, d=32, seed=0) -> torch.Tensor:
    _, h, w = schedule[-1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d, h, w, generator=g)


def _sum(tensors):
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


# ----------------------------------------------------------------------------------------------------- codes


@pytest.mark.parametrize("d", [8, 16, 32, 56])
def test_code_scale_is_one_over_sqrt_d(d):
    c = code_scale(d)
    assert float(np.float32(c)) == c  # exactly representable in float32
    assert abs(c - 1 / math.sqrt(d)) <= float(np.spacing(np.float32(c)))
    row = torch.full((d,), c, dtype=torch.float32)
    assert abs(float(row.norm()) - 1.0) < 1e-6


def test_bits_to_codes_are_plus_minus_c():
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (2, 5, 7, 32), generator=g, dtype=torch.uint8)
    codes = bits_to_codes(bits)
    c = code_scale(32)
    assert codes.shape == (2, 32, 5, 7) and codes.dtype == torch.float32
    assert set(codes.unique().tolist()) == {c, -c}
    assert torch.equal(codes > 0, bits.permute(0, 3, 1, 2).bool())
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, 5, 7), rtol=0, atol=1e-6)
    assert codes.is_contiguous(memory_format=torch.channels_last)


def test_bsq_quantize_bits_are_signs():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 32, 4, 6, generator=g)
    r[0, 5, 1, 1] = 0.0  # an exact zero is bit 0
    codes, bits = bsq_quantize(r)
    assert bits.shape == (3, 4, 6, 32) and bits.dtype == torch.uint8
    assert torch.equal(bits, (r > 0).permute(0, 2, 3, 1).to(torch.uint8))
    assert bits[0, 1, 1, 5] == 0
    assert torch.equal(codes, bits_to_codes(bits))
    _, bits_scaled = bsq_quantize(r * 1e3)  # l2 normalisation: the scale of the residual does not matter
    assert torch.equal(bits_scaled, bits)


def test_bsq_quantize_straight_through_gradient():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(1, 32, 2, 3, generator=g, requires_grad=True)
    w = torch.randn(1, 32, 2, 3, generator=g)
    codes, bits = bsq_quantize(r)
    assert torch.equal(codes.detach(), bits_to_codes(bits))  # forward value untouched by the gradient trick
    (codes * w).sum().backward()
    r2 = r.detach().clone().requires_grad_(True)
    (F.normalize(r2, dim=1) * w).sum().backward()
    torch.testing.assert_close(r.grad, r2.grad)
    assert r.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- resizing


def test_area_resize_averages_overlapping_windows():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 64, 64, generator=g)
    out = area_resize(x, (6, 6))
    want = torch.empty(1, 2, 6, 6)
    for i in range(6):
        y0, y1 = (i * 64) // 6, -((-(i + 1) * 64) // 6)
        for j in range(6):
            x0, x1 = (j * 64) // 6, -((-(j + 1) * 64) // 6)
            want[..., i, j] = x[..., y0:y1, x0:x1].mean(dim=(-2, -1))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert area_resize(x, (1, 64, 64)) is x  # schedule-style size, same grid: identity


def test_bilinear_resize_point_samples_and_matches_2d_bilinear():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 64, 64, generator=g)
    out = bilinear_resize(x, (2, 2))  # samples at 15.5 and 47.5: mean of the 2x2 neighbours, no antialias
    torch.testing.assert_close(out[..., 0, 0], x[..., 15:17, 15:17].mean(dim=(-2, -1)), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 1, 1], x[..., 47:49, 47:49].mean(dim=(-2, -1)), rtol=0, atol=1e-6)
    for size in [(1, 1), (5, 4), (48, 48), (70, 56)]:
        for src in (x, x[..., :5, :7]):
            want = F.interpolate(src, size=size, mode="bilinear", align_corners=False)
            torch.testing.assert_close(bilinear_resize(src, size), want, rtol=0, atol=1e-5)
    assert bilinear_resize(x, (64, 64)) is x


# ----------------------------------------------------------------------------------------------------- multi-scale


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_multiscale_outputs_agree_with_their_bits(name):
    schedule = SCHEDULES[name]
    z = _latent(schedule)
    out = multiscale_quantize(z, schedule)
    assert out.schedule == schedule
    assert [tuple(b.shape) for b in out.bits] == [(2, h, w, 32) for _, h, w in schedule]
    assert all(b.dtype == torch.uint8 for b in out.bits)
    per_scale = scale_codes_on_grid(out.bits, schedule)
    assert torch.equal(_sum(per_scale), out.summed_codes)
    assert torch.equal(inputs_from_bits(out.bits, schedule), out.x_wo_prefix)
    assert out.x_wo_prefix.shape == (2, num_tokens(schedule) - 1, 32)
    assert torch.equal(out.gt_bits, torch.cat([b.reshape(2, -1, 32) for b in out.bits], dim=1))
    offs = scale_offsets(schedule)
    for k in range(len(schedule) - 1):  # scale k+1's inputs are the codes of scales <= k, resized
        seg = out.x_wo_prefix[:, offs[k + 1] - 1 : offs[k + 2] - 1]
        assert torch.equal(seg, next_scale_input(_sum(per_scale[: k + 1]), schedule, k))
    # scale 0 codes the sign of the mean latent; the last scale is coded at full size
    assert torch.equal(out.bits[0][:, 0, 0], (z.mean(dim=(-2, -1)) > 0).to(torch.uint8))
    last = z - _sum(per_scale[:-1])
    assert torch.equal(out.bits[-1], (last > 0).permute(0, 2, 3, 1).to(torch.uint8))


def test_multiscale_rejects_mismatched_grid():
    schedule = SCHEDULES["square_0.06M"]
    with pytest.raises(ValueError, match="last grid"):
        multiscale_quantize(torch.randn(1, 32, 12, 12), schedule)
    with pytest.raises(ValueError, match="bits of scale 1"):
        scale_codes_on_grid([torch.zeros(1, 1, 1, 32, dtype=torch.uint8), torch.zeros(1, 3, 3, 32)], schedule)


@pytest.mark.parametrize("noise_layers,strength", [(0, 0.3), (-1, 0.3), (13, 0.0)])
def test_bsc_without_noise_equals_clean_inputs(noise_layers, strength):
    schedule = SCHEDULES["ratio0.75_0.06M"]
    z = _latent(schedule, seed=7)
    clean = multiscale_quantize(z, schedule)
    gt_bits, x = bitwise_self_correction(z, schedule, noise_layers, strength, torch.Generator().manual_seed(0))
    assert torch.equal(gt_bits, clean.gt_bits)
    assert torch.equal(x, clean.x_wo_prefix)


def test_bsc_seeded_is_reproducible_and_flips_bits():
    schedule = SCHEDULES["square_0.06M"]
    z = _latent(schedule, batch=8, seed=8)
    clean = multiscale_quantize(z, schedule)
    k = len(schedule)

    def run(seed, strength=0.3):
        return bitwise_self_correction(z, schedule, k, strength, torch.Generator().manual_seed(seed))

    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    gt_a, x_a = run(123)
    assert torch.equal(torch.rand(3), expected_global)  # the draws come from the generator only
    gt_b, x_b = run(123)
    assert torch.equal(gt_a, gt_b) and torch.equal(x_a, x_b)
    _, x_c = run(124)
    assert not torch.equal(x_a, x_c)
    assert not torch.equal(x_a, clean.x_wo_prefix)
    # Labels of scale 0 are always the clean bits; the inputs of scale 1 (constant over its 2x2 grid) are the
    # requantised, possibly flipped, scale-0 codes.
    assert torch.equal(gt_a[:, :1], clean.gt_bits[:, :1])
    first = x_a[:, 0]
    assert set(first.abs().unique().tolist()) == {code_scale(32)}
    flipped = ((first > 0).to(torch.uint8) != clean.gt_bits[:, 0]).float().mean().item()
    assert 0.0 < flipped <= 0.45  # p <= 0.3 per scale; 256 bits


# ----------------------------------------------------------------------------------------------------- VAE


def test_group_norm_rule():
    assert [group_norm_groups(c) for c in (24, 48, 96, 128, 512)] == [24, 24, 32, 32, 32]
    with pytest.raises(ValueError, match="multiple of 32 or 24"):
        group_norm_groups(20)
    with pytest.raises(ValueError):
        BSQVAE(base_ch=20, ch_mult=(1, 2), num_res_blocks=1, codebook_dim=8, patch_size=2)


def _tiny_vae(seed=0) -> BSQVAE:
    torch.manual_seed(seed)
    model = BSQVAE(base_ch=24, ch_mult=(1, 2), num_res_blocks=1, codebook_dim=8, patch_size=2).eval()
    with torch.no_grad():  # non-trivial norm affines so a lost GroupNorm parameter shows
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.02)
    return model


def test_tiny_vae_module_tree():
    model = _tiny_vae()
    keys = set(model.state_dict())
    assert "encoder.conv_in.conv.weight" in keys
    assert "encoder.down.0.block.0.norm1.norm.weight" in keys
    assert "encoder.down.0.downsample.conv.conv.weight" in keys
    assert "encoder.down.1.block.0.nin_shortcut.conv.weight" in keys
    assert not any(k.startswith("encoder.down.1.downsample") for k in keys)  # only levels < log2(patch)
    assert "decoder.up.1.upsample.conv.conv.weight" in keys
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    assert len(model.decoder.up[0].block) == 2  # num_res_blocks + 1
    assert model.decoder.up[0].block[0].norm1.norm.num_groups == 24  # 48 channels
    assert not any("lfq" in k for k in keys)


def test_vae_save_and_load_round_trip(tmp_path):
    model = _tiny_vae(seed=3)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)]
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        codes = model.encode(img, schedule)
        recon = model.decode_bits(codes.bits, schedule)
    assert codes.raw_features.shape == (2, 8, 8, 8)
    assert recon.shape == img.shape and recon.abs().max() <= 1.0
    model.save_pretrained(tmp_path / "vae")
    loaded = BSQVAE.from_pretrained(tmp_path / "vae").eval()
    fields = ("base_ch", "ch_mult", "num_res_blocks", "codebook_dim", "patch_size")
    assert {f: loaded.config[f] for f in fields} == {f: model.config[f] for f in fields} | {"ch_mult": [1, 2]}
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        codes2 = loaded.encode(img, schedule)
        recon2 = loaded.decode_bits(codes2.bits, schedule)
    assert torch.equal(codes2.raw_features, codes.raw_features)
    assert all(torch.equal(a, b) for a, b in zip(codes2.bits, codes.bits, strict=True))
    assert torch.equal(recon2, recon)


def test_vae_input_checks():
    model = _tiny_vae()
    with pytest.raises(ValueError, match="multiple of the VAE patch size"):
        model.encode_raw(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_raw(torch.zeros(1, 1, 16, 16))
    with torch.no_grad():
        out = model.decode(torch.randn(1, 8, 4, 4) * 50)
    assert out.abs().max() <= 1.0
