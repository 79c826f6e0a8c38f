"""Metrics on tiny arrays whose values are worked out by hand or were computed by an independent implementation.

``SKIMAGE``: values printed by scikit-image 0.26.0, ``skimage.metrics.structural_similarity(a, b,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)`` (``channel_axis=2`` for colour,
``full=True`` for the map), ``mean_squared_error`` and ``peak_signal_noise_ratio(data_range=1.0)``, on the arrays
built below (same numpy generators and seeds). scikit-image is not a dependency: the numbers are kept here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from editinfinity.metrics import background_metrics, mse, psnr, ssim, ssim_map, zero_edited

C1, C2 = 0.01 ** 2, 0.03 ** 2  # (K1 L)^2, (K2 L)^2 with L = 1
SKIMAGE = {
    "flat": 0.8000639795265515,
    "bright_pixel": 0.0002643743162066147,
    "random_colour": 0.09009460543775609,
    "random_channel0": 0.042860590938794844,
    "random_masked_mean": 0.13958683502129182,  # mean of the full map over rows 5:9, columns 7:15
    "zero_protocol": {"mse": 0.0010683612345435644, "psnr": 29.712818787274664, "ssim": 0.9999999338805474},
}


def test_mse_and_psnr_by_hand():
    a = np.zeros((2, 2))
    b = np.array([[0.5, 0.0], [0.0, 0.0]])
    assert mse(a, b) == 0.0625  # 0.25 / 4
    assert psnr(a, b) == pytest.approx(10 * math.log10(16))  # 12.0412 dB
    # Masked: only the pixels in the mask count.
    only_diff = np.array([[True, False], [False, False]])
    assert mse(a, b, only_diff) == 0.25
    assert psnr(a, b, only_diff) == pytest.approx(10 * math.log10(4))
    assert psnr(a, b, ~only_diff) == math.inf
    # Float masks weight the pixels: 0.25 * 1 / (1 + 1) = 0.125.
    assert mse(a, b, np.array([[1.0, 1.0], [0.0, 0.0]])) == 0.125


def test_mse_channels_and_input_types():
    a = np.zeros((1, 2, 3))
    b = a.copy()
    b[0, 1, 2] = 0.3
    assert mse(a, b) == pytest.approx(0.09 / 6)
    # torch tensors are (C, H, W); the same numbers give the same value.
    ta, tb = torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1)
    assert mse(ta, tb[None]) == pytest.approx(0.09 / 6)
    # uint8 / PIL inputs are scaled by 1/255; data_range rescales PSNR.
    pa = Image.fromarray(np.zeros((2, 2), dtype=np.uint8))
    pb = Image.fromarray(np.array([[255, 0], [0, 0]], dtype=np.uint8))
    assert mse(pa, pb) == 0.25 and psnr(pa, pb) == pytest.approx(10 * math.log10(4))
    assert psnr(np.zeros((2, 2)), np.array([[127.5, 0], [0, 0]]), data_range=255) == pytest.approx(10 * math.log10(16))
    with pytest.raises(ValueError, match="differ in shape"):
        mse(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="selects no pixel"):
        mse(a, b, np.zeros((1, 2), dtype=bool))


def test_ssim_constant_images_by_hand():
    # One window position; both images flat: variances and covariance are 0, so SSIM = luminance term only.
    a, b = np.full((11, 11), 0.5), np.full((11, 11), 0.25)
    expected = (2 * 0.5 * 0.25 + C1) / (0.5 ** 2 + 0.25 ** 2 + C1)  # 0.2501 / 0.3126 = 0.80006...
    assert ssim_map(a, b).shape == (1, 1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert ssim(a, b) == pytest.approx(SKIMAGE["flat"], rel=1e-12)


def test_ssim_single_bright_pixel_by_hand():
    # a: one white pixel at the window centre, b: black. With the centre weight w_c of the normalised
    # 11x11 Gaussian (sigma 1.5): mu_a = w_c, var_a = w_c - w_c^2, mu_b = var_b = cov = 0.
    g0 = 1.0 / sum(math.exp(-(x * x) / (2 * 1.5 ** 2)) for x in range(-5, 6))  # 0.266011
    w_c = g0 * g0  # 0.070762
    expected = (C1 * C2) / ((w_c ** 2 + C1) * (w_c - w_c ** 2 + C2))
    a = np.zeros((11, 11))
    a[5, 5] = 1.0
    assert g0 == pytest.approx(0.266011, abs=1e-6)
    assert ssim(a, np.zeros((11, 11))) == pytest.approx(expected, rel=1e-6)
    assert ssim(a, np.zeros((11, 11))) == pytest.approx(SKIMAGE["bright_pixel"], rel=1e-9)


def test_ssim_identity_symmetry_and_colour():
    rng = np.random.default_rng(0)
    a, b = rng.random((24, 20, 3)), rng.random((24, 20, 3))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    # Colour SSIM = mean over the channels' maps, as scikit-image computes it.
    assert ssim(a, b) == pytest.approx(SKIMAGE["random_colour"], abs=1e-12)
    assert ssim(a[..., 0], b[..., 0]) == pytest.approx(SKIMAGE["random_channel0"], abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((10, 20)), np.zeros((10, 20)))


def test_masked_ssim_is_mean_of_map_over_mask():
    rng = np.random.default_rng(1)
    a, b = rng.random((21, 21)), rng.random((21, 21))
    assert ssim_map(a, b).shape == (11, 11)  # entry (i, j) belongs to pixel (i + 5, j + 5)
    mask = np.zeros((21, 21), dtype=bool)
    mask[5:9, 7:15] = True
    assert ssim(a, b, mask) == pytest.approx(SKIMAGE["random_masked_mean"], abs=1e-12)
    border = np.zeros((21, 21), dtype=bool)
    border[:3] = True
    with pytest.raises(ValueError, match="border"):
        ssim(a, b, border)


def test_background_metrics_two_protocols():
    rng = np.random.default_rng(2)
    src = rng.random((16, 16, 3))
    edited = src.copy()
    edit = np.zeros((16, 16), dtype=bool)
    edit[4:10, 4:10] = True
    edited[edit] = 1.0 - edited[edit]  # change only the edited region
    sel = background_metrics(src, edited, edit, method="select")
    assert sel["mse"] == 0.0 and sel["psnr"] == math.inf
    zero = background_metrics(src, edited, edit, method="zero")
    assert zero["mse"] == 0.0 and zero["ssim"] == pytest.approx(1.0)
    # Outside-the-mask change: "zero" scores the whole zeroed images.
    edited[0, 0] = 0.0
    za, zb = zero_edited(src, edit), zero_edited(edited, edit)
    assert za[5, 5].tolist() == zb[5, 5].tolist() == [0.0, 0.0, 0.0] and np.array_equal(za[~edit], src[~edit])
    zero = background_metrics(src, edited, edit, method="zero")
    for key, value in SKIMAGE["zero_protocol"].items():
        assert zero[key] == pytest.approx(value, rel=1e-12), key
    # by hand: the one changed pixel, zeroed, over every value of the image
    assert zero["mse"] == pytest.approx(np.sum(src[0, 0] ** 2) / (16 * 16 * 3), rel=1e-12)
    with pytest.raises(ValueError, match="method"):
        background_metrics(src, edited, edit, method="crop")
