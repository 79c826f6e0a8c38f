"""Image similarity metrics for background preservation: MSE, PSNR and SSIM, whole-image or masked.

Inputs are images with values in ``[0, data_range]`` (default 1): PIL images and ``uint8`` arrays are divided by 255;
float numpy arrays are ``(H, W)`` or ``(H, W, C)``; torch tensors follow torch's ``(C, H, W)`` / ``(1, C, H, W)``
layout. Everything is computed in float64.

SSIM follows Wang et al. (2004) with the constants used by torchmetrics (and therefore by the PIE-Bench evaluation of
PnP-Inversion): an 11x11 Gaussian window with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, population (not sample)
statistics, and the map kept only where the window lies inside the image (``(H - 10) x (W - 10)`` positions, each
belonging to the window's centre pixel); colour images average the per-channel maps.

Two masked protocols (``mask`` / ``edit_mask`` are ``(H, W)``):

* *select*: ``mse``/``psnr``/``ssim`` with ``mask=`` average only over the pixels where ``mask`` is true (for SSIM:
  the map positions whose centre pixel is in the mask);
* *zero* (PnP-Inversion's "unedit part"): both images are multiplied by ``1 - edit_mask`` and the whole-image metric
  is taken; see :func:`background_metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["as_float_image", "mse", "psnr", "ssim", "ssim_map", "zero_edited", "background_metrics"]


def as_float_image(x) -> np.ndarray:
    """``(H, W, C)`` float64 array from a PIL image, numpy array or torch tensor (see the module docstring)."""
    if isinstance(x, Image.Image):
        a = np.asarray(x).astype(np.float64) / 255.0
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of shape {tuple(t.shape)}")
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        a = t.to(torch.float64).numpy() if t.is_floating_point() else t.numpy().astype(np.float64) / 255.0
    else:
        arr = np.asarray(x)
        a = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {a.shape}")
    return a


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_float_image(a), as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def _mask(mask, hw: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.float64)
    if m.shape != hw:
        raise ValueError(f"`mask` must have the image's (H, W) = {hw}, got {m.shape}")
    if m.sum() <= 0:
        raise ValueError("`mask` selects no pixel")
    return m


def mse(a, b, mask=None) -> float:
    """Mean squared error over all pixels and channels, or over the pixels where ``mask`` is true (a float
    mask acts as per-pixel weights)."""
    x, y = _pair(a, b)
    sq = (x - y) ** 2
    if mask is None:
        return float(sq.mean())
    m = _mask(mask, x.shape[:2])
    return float((sq * m[:, :, None]).sum() / (m.sum() * x.shape[2]))


def psnr(a, b, mask=None, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB; ``inf`` for identical images."""
    err = mse(a, b, mask)
    return math.inf if err == 0 else 10.0 * math.log10(data_range ** 2 / err)


def _gaussian_window(win_size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(a, b, *, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
             k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """``(H - win_size + 1, W - win_size + 1)`` SSIM map (mean over channels); entry ``(i, j)`` belongs to pixel
    ``(i + win_size // 2, j + win_size // 2)``."""
    x, y = _pair(a, b)
    h, w, c = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size} px, got {w}x{h}")
    g = _gaussian_window(win_size, sigma)
    # The Gaussian window is separable: a row pass then a column pass (float64 2-D convolutions are slow on CPU;
    # this is ~7x faster and equal to the 11x11 kernel to ~1e-15).
    rows = g.view(1, 1, 1, win_size).expand(c, 1, 1, win_size)
    cols = g.view(1, 1, win_size, 1).expand(c, 1, win_size, 1)

    def filt(t: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1)[None]
        return F.conv2d(F.conv2d(x, rows, groups=c), cols, groups=c)[0]

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=0).numpy()


def ssim(a, b, mask=None, *, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM; with ``mask``, the (weighted) mean of the map over the positions whose centre pixel is in it."""
    s = ssim_map(a, b, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2)
    if mask is None:
        return float(s.mean())
    x = as_float_image(a)
    m = _mask(mask, x.shape[:2])
    pad = win_size // 2
    m = m[pad: pad + s.shape[0], pad: pad + s.shape[1]]
    if m.sum() <= 0:
        raise ValueError(f"`mask` selects no pixel at least {pad} px away from the border (SSIM window)")
    return float((s * m).sum() / m.sum())


def zero_edited(a, edit_mask) -> np.ndarray:
    """``a * (1 - edit_mask)``: the image with the edited region set to 0 (PnP-Inversion's background protocol)."""
    x = as_float_image(a)
    m = np.asarray(edit_mask.detach().cpu() if isinstance(edit_mask, torch.Tensor) else edit_mask, dtype=np.float64)
    if m.shape != x.shape[:2]:
        raise ValueError(f"`edit_mask` must have the image's (H, W) = {x.shape[:2]}, got {m.shape}")
    return x * (1.0 - m)[:, :, None]


def background_metrics(source, edited, edit_mask, *, method: str = "zero", data_range: float = 1.0) -> dict:
    """PSNR / MSE / SSIM of the part outside ``edit_mask`` (True = edited).

    ``method="zero"`` zeroes the edited region in both images and scores the whole images (the PIE-Bench numbers);
    ``method="select"`` averages only over the kept pixels.
    """
    if method == "zero":
        x, y = zero_edited(source, edit_mask), zero_edited(edited, edit_mask)
        return {"psnr": psnr(x, y, data_range=data_range), "mse": mse(x, y), "ssim": ssim(x, y, data_range=data_range)}
    if method == "select":
        keep = 1.0 - np.asarray(edit_mask.detach().cpu() if isinstance(edit_mask, torch.Tensor) else edit_mask,
                                dtype=np.float64)
        return {"psnr": psnr(source, edited, keep, data_range=data_range), "mse": mse(source, edited, keep),
                "ssim": ssim(source, edited, keep, data_range=data_range)}
    raise ValueError(f"`method` must be 'zero' or 'select', got {method!r}")
