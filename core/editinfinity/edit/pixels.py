"""Kept pixels: the source's own pixels where nothing was edited, the decoded edit where it was (``--keep-pixels``).

The per-scale blending of the method (``edit/generate.py``) keeps the source *codes* exactly where the keep weight
``W`` is 1, but the decoder's normalisation layers pool over the whole picture, so every decoded pixel moves a
little when the edited region changes (docs/method.md, "Kept pixels"). With kept pixels the output is

    out = Wp * source + (1 - Wp) * decoded

where ``Wp`` is the keep weight on the pixel grid: ``W`` (on the last latent grid) upsampled bilinearly (smooth, no
seam at cell edges), set to exactly 1 where every cell that can reach the pixel through the interpolation has
``W = 1`` and to exactly 0 where every such cell has ``W = 0``. Far from the mask the output is therefore the source
bit for bit, inside the edit it is the decode bit for bit, and the smoothing band of ``W`` becomes a smooth
cross-fade between the two.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["pixel_keep_weights", "keep_source_pixels", "to_bytes"]


def to_bytes(img: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8, rounding to the nearest byte (the published code
    truncates; docs/method.md "Output encoding"). The one conversion of decoded pictures to bytes."""
    arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def _neighbourhood(grid: torch.Tensor, op: str) -> torch.Tensor:
    """3x3 minimum (``op='min'``) or maximum of a ``(h, w)`` grid, the border replicated."""
    x = grid[None, None]
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    pooled = F.max_pool2d(-x if op == "min" else x, 3, stride=1)
    return (-pooled if op == "min" else pooled)[0, 0]


def pixel_keep_weights(weights, size: tuple[int, int]) -> torch.Tensor:
    """Keep weight per pixel, ``(H, W)`` float32 in ``[0, 1]``, from the ``(h_K, w_K)`` grid ``weights``.

    Bilinear upsampling (half-pixel centres) of the grid to ``size = (H, W)``; a pixel's value mixes at most the
    2x2 cells around its centre, all inside the 3x3 neighbourhood of its own cell. Where that neighbourhood is all 1
    (all 0) the weight is set to exactly 1 (0), so pixels away from the band take one image unchanged.
    """
    w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
    if w.dim() != 2:
        raise ValueError(f"`weights` must be a (rows, cols) grid, got shape {tuple(w.shape)}")
    h, wd = (int(v) for v in size)
    up = F.interpolate(w[None, None], size=(h, wd), mode="bilinear", align_corners=False)[0, 0].clamp(0.0, 1.0)
    all_one = F.interpolate(_neighbourhood(w, "min")[None, None], size=(h, wd), mode="nearest")[0, 0] >= 1.0
    all_zero = F.interpolate(_neighbourhood(w, "max")[None, None], size=(h, wd), mode="nearest")[0, 0] <= 0.0
    up = torch.where(all_one, torch.ones_like(up), up)
    return torch.where(all_zero, torch.zeros_like(up), up)


def keep_source_pixels(source: Image.Image, decoded: Image.Image, weights) -> Image.Image:
    """The decoded edit with the source's pixels kept where the keep weight is 1 (module docstring).

    ``source`` is the picture the model encoded (the preprocessed image) and ``decoded`` the decode of the edited
    codes; both have the same size. The mix is rounded to the nearest byte; weight-1 pixels are copied from
    ``source`` and weight-0 pixels from ``decoded`` unchanged.
    """
    if source.size != decoded.size:
        raise ValueError(f"source {source.size} and decoded edit {decoded.size} differ in size; the source must be the "
                         "preprocessed picture the model encoded")
    wp = pixel_keep_weights(weights, (decoded.height, decoded.width)).numpy()[:, :, None]
    src = np.asarray(source.convert("RGB"))
    dec = np.asarray(decoded.convert("RGB"))
    mixed = np.rint(wp * src.astype(np.float32) + (1.0 - wp) * dec.astype(np.float32)).clip(0, 255).astype(np.uint8)
    out = np.where(wp >= 1.0, src, np.where(wp <= 0.0, dec, mixed))
    return Image.fromarray(np.ascontiguousarray(out))
