"""The BSQ VAE of Infinity (``infinity_vae_d32reg`` family): a convolutional encoder/decoder around the bitwise
multi-scale quantiser of :mod:`editinfinity.models.quantizer`.

Module tree and parameter names equal the reference's (``encoder.down.0.block.0.norm1.norm.weight``, ...), where
every convolution is wrapped as ``.conv`` and every GroupNorm as ``.norm``; :func:`editinfinity.models.checkpoints.load_vae_state_dict` also takes
the flat spelling of official checkpoints. The quantiser has no parameters (its ``lfq.mask`` constant is dropped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from editinfinity.models.quantizer import (
    MultiScaleCodes,
    _autocast_off,
    multiscale_quantize,
    scale_codes_on_grid,
)

__all__ = ["BSQVAE", "group_norm_groups"]

logger = logging.getLogger(__name__)



def group_norm_groups(channels: int) -> int:
    """GroupNorm group count of the reference: 32 if ``channels % 32 == 0``, else 24 if ``% 24 == 0``."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(
        f"{channels} channels: the BSQ VAE's GroupNorm needs a multiple of 32 or 24; change base_ch or ch_mult"
    )


def _swish(x: torch.Tensor) -> torch.Tensor:
    # Written as x * sigmoid(x) (not F.silu) because that is the reference's op and its rounding.
    return x * torch.sigmoid(x)


class _Conv(nn.Module):
    """``nn.Conv2d`` held as ``.conv`` (the reference's parameter names)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    """Affine GroupNorm (eps 1e-6) held as ``.norm``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_norm_groups(channels), channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))``; 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _Norm(c_in)
        self.conv1 = _Conv(c_in, c_out, 3, padding=1)
        self.norm2 = _Norm(c_out)
        self.conv2 = _Conv(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = _Conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (halves even sizes exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and, where the level changes resolution, ``downsample`` or
    ``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Image ``(B, 3, H, W)`` -> latent ``(B, z_channels, H/p, W/p)``; levels ``< log2(p)`` downsample."""

    def __init__(self, base_ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, n_down: int):
        super().__init__()
        self.conv_in = _Conv(3, base_ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = base_ch
        for level, mult in enumerate(ch_mult):
            c_out = base_ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out))
                c_in = c_out
            stage = _Level(blocks)
            if level < n_down:
                stage.downsample = Downsample(c_in)
            self.down.append(stage)
        self.mid = _Mid(c_in)
        self.norm_out = _Norm(c_in)
        self.conv_out = _Conv(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image; ``up.{l}`` is indexed by level and run from the last level down to 0, each with
    ``num_res_blocks + 1`` blocks; levels ``1 <= l <= log2(p)`` upsample after their blocks."""

    def __init__(self, base_ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, n_up: int):
        super().__init__()
        c_in = base_ch * ch_mult[-1]
        self.conv_in = _Conv(z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in)
        stages: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            c_out = base_ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out))
                c_in = c_out
            stage = _Level(blocks)
            if 1 <= level <= n_up:
                stage.upsample = Upsample(c_in)
            stages.append(stage)
        self.up = nn.ModuleList(reversed(stages))
        self.norm_out = _Norm(c_in)
        self.conv_out = _Conv(c_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BSQVAE(ModelMixin, ConfigMixin):
    """Infinity's BSQ VAE. ``encode`` gives the multi-scale bits of an image, ``decode`` maps summed codes back.

    Images are ``(B, 3, H, W)`` in [-1, 1] with H, W multiples of ``patch_size``; latents are
    ``(B, codebook_dim, H/patch_size, W/patch_size)``.
    """

    @register_to_config
    def __init__(
        self,
        base_ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4, 4),
        num_res_blocks: int = 2,
        codebook_dim: int = 32,
        patch_size: int = 16,
    ):
        super().__init__()
        n_scale = math.log2(patch_size) if patch_size > 0 else -1.0
        if n_scale < 0 or n_scale != int(n_scale):
            raise ValueError(f"patch_size must be a power of two, got {patch_size}")
        n_scale = int(n_scale)
        if len(ch_mult) < n_scale + 1:
            raise ValueError(
                f"ch_mult {list(ch_mult)} has {len(ch_mult)} levels; patch_size {patch_size} needs at least {n_scale + 1}"
            )
        if base_ch <= 0 or num_res_blocks <= 0 or codebook_dim <= 0:
            raise ValueError("base_ch, num_res_blocks and codebook_dim must be positive")
        ch_mult = [int(m) for m in ch_mult]
        self.encoder = Encoder(base_ch, ch_mult, num_res_blocks, codebook_dim, n_down=n_scale)
        self.decoder = Decoder(base_ch, ch_mult, num_res_blocks, codebook_dim, n_up=n_scale)

    def _check_image(self, img: torch.Tensor) -> None:
        p = self.config.patch_size
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W) in [-1, 1], got shape {tuple(img.shape)}")
        if img.shape[-2] % p or img.shape[-1] % p:
            raise ValueError(
                f"image size {tuple(img.shape[-2:])} is not a multiple of the VAE patch size {p}; "
                "resize to the schedule's pixel size (schedules.pixel_size)"
            )

    def encode_raw(self, img: torch.Tensor) -> torch.Tensor:
        """Encoder features ``(B, d, H/p, W/p)`` float32 before quantisation (autocast off: bits are signs)."""
        self._check_image(img)
        # Contiguous NCHW on purpose: an image made by permuting an HWC array is channels-last, and on CPU the
        # channels-last float32 convolutions were measured ~1e-3 off a float64 result (the contiguous ones ~1e-6),
        # enough to flip bits.
        img = img.to(device=self.device, dtype=self.dtype).contiguous()
        with _autocast_off(img.device):
            h = self.encoder(img)
        return h.float()

    def encode(self, img: torch.Tensor, schedule) -> MultiScaleCodes:
        """Multi-scale bits (plus teacher-forcing inputs and raw features) of ``img`` with ``schedule``."""
        raw = self.encode_raw(img)
        codes = multiscale_quantize(raw, schedule)
        codes.raw_features = raw
        return codes

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, H, W)`` float32 clamped to [-1, 1] from summed codes ``z (B, d, h, w)``."""
        if z.ndim != 4 or z.shape[1] != self.config.codebook_dim:
            raise ValueError(f"z must be (B, {self.config.codebook_dim}, h, w), got shape {tuple(z.shape)}")
        x = self.decoder(z.to(device=self.device, dtype=self.dtype).contiguous())  # see encode_raw
        return x.float().clamp(-1.0, 1.0)

    def decode_bits(self, bits_list: Sequence[torch.Tensor], schedule) -> torch.Tensor:
        """Decode per-scale bits ``[(B, h_k, w_k, d)]``: sum of the upsampled codes, then :meth:`decode`."""
        if not bits_list:
            raise ValueError("no bits to decode")
        summed = None
        for s in scale_codes_on_grid(bits_list, schedule):
            summed = s if summed is None else summed + s
        return self.decode(summed)
