"""BSQ VAE checkpoints: the reference's wrapped names and the official flat names -> our modules, loaded strictly."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError, format_key_problems

if TYPE_CHECKING:
    from ..bsq_vae import BSQVAE

logger = logging.getLogger(__name__)

#: Checkpoint keys that hold constants of the reference quantiser (``2**[d-1..0]``), not weights.
IGNORED_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def _unwrap(state_dict: Mapping) -> Mapping:
    if "vae" in state_dict and isinstance(state_dict["vae"], Mapping):
        return state_dict["vae"]
    return state_dict


def _candidates(key: str) -> list[str]:
    """The model names a checkpoint key may stand for: itself, or the flat spelling of a wrapped conv / norm."""
    out = [key]
    stem, _, leaf = key.rpartition(".")
    if stem and leaf in ("weight", "bias"):
        out += [f"{stem}.conv.{leaf}", f"{stem}.norm.{leaf}"]
    return out


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def load_vae_state_dict(model: BSQVAE, state_dict: Mapping, *, source: str = "checkpoint") -> BSQVAE:
    """Load a BSQ VAE state dict strictly; returns ``model``.

    Accepts the reference's wrapped names (``...conv_in.conv.weight``, ``...norm1.norm.weight``), the flat names of
    official checkpoints (``...conv_in.weight``, ``...norm1.weight``), a dict with a top-level ``'vae'`` entry, and
    drops the quantiser constants ``quantizer.lfq.mask`` / ``quantize.lfq.mask``. Tensors are cast to the model's
    dtypes (the parity weights are stored in float16). Raises :class:`CheckpointError` listing missing, unexpected
    and wrongly shaped keys unless every model tensor is loaded exactly once.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a mapping of tensor names to tensors, got {type(state_dict).__name__}")
    state_dict = _unwrap(state_dict)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    wrong: list[str] = []
    for key, value in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            unexpected.append(f"{key} (not a tensor: {type(value).__name__})")
            continue
        name = next((c for c in _candidates(key) if c in target), None)
        if name is None:
            unexpected.append(f"{key} {_fmt_shape(value.shape)}")
        elif name in origin:
            unexpected.append(f"{key} (duplicates {origin[name]} -> {name})")
        elif tuple(value.shape) != tuple(target[name].shape):
            origin[name] = key
            wrong.append((key, tuple(value.shape), tuple(target[name].shape)))
        else:
            origin[name] = key
            mapped[name] = value.to(dtype=target[name].dtype)
    missing = [f"{k} {_fmt_shape(v.shape)}" for k, v in target.items() if k not in origin]
    if missing or unexpected or wrong:
        cfg = ", ".join(f"{k}={v}" for k, v in model.config.items() if not k.startswith("_"))
        raise CheckpointError(format_key_problems(
            source, missing, unexpected, wrong, model=f"BSQVAE({cfg})",
            hint="Use the VAE file that belongs to this config, or build BSQVAE with the checkpoint's config."))
    model.load_state_dict(mapped, strict=True)
    renamed = sum(1 for name, key in origin.items() if name != key)
    logger.debug("loaded %d VAE tensors from %s (%d under flat names)", len(mapped), source, renamed)
    return model
