"""Official Infinity state dicts <-> our module names.

Official files name blocks ``block_chunks.{c}.module.{j}.*`` (block ``i = c * depth/chunks + j``) or
``blocks.{i}.*`` (one chunk); we always use ``blocks.{i}.*`` and every other key unchanged. Loading is strict after
the reference's explicit rules: legacy buffers are dropped, ``*.zero_k_bias`` must be zero (absent ones are
filled), and a ``cfg_uncond`` with another row count is truncated or completed with the model's own rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import CheckpointError, format_key_problems

#: Buffers of older reference versions; the current model has none of them.
LEGACY_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")

_CHUNKED = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^blocks\.(\d+)\.(.+)$")


def chunk_count(keys: Iterable[str]) -> int:
    """Highest ``block_chunks.{c}`` index among ``keys`` plus one (0 when the blocks are not chunked).

    Only a description of the keys present: a partial dict (a LoRA state, one gradient) names fewer chunks than the
    model has, so conversions take the chunk count from the model configuration (:func:`flatten_block_keys`).
    """
    found = [int(m.group(1)) for k in keys if (m := _CHUNKED.match(k))]
    return max(found) + 1 if found else 0


def flat_block_key(key: str, blocks_per_chunk: int) -> str:
    """``block_chunks.{c}.module.{j}.rest`` -> ``blocks.{c*blocks_per_chunk+j}.rest``; other keys unchanged."""
    m = _CHUNKED.match(key)
    if m is None:
        return key
    c, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    if j >= blocks_per_chunk:
        raise CheckpointError(f"key {key!r} has block {j} in a chunk of {blocks_per_chunk} blocks; the checkpoint "
                              "does not match the model depth")
    return f"blocks.{c * blocks_per_chunk + j}.{rest}"


def chunked_block_key(key: str, blocks_per_chunk: int) -> str:
    """``blocks.{i}.rest`` -> ``block_chunks.{i // n}.module.{i % n}.rest``; other keys unchanged."""
    m = _FLAT.match(key)
    if m is None:
        return key
    i = int(m.group(1))
    return f"block_chunks.{i // blocks_per_chunk}.module.{i % blocks_per_chunk}.{m.group(2)}"


def flatten_block_keys(state_dict: Mapping[str, torch.Tensor], depth: int,
                       block_chunks: int) -> tuple[dict[str, torch.Tensor], int]:
    """Rename chunked block keys to ``blocks.{i}``; returns (new dict, chunks of its layout: 1 when flat).

    ``block_chunks`` is the model configuration's chunk count (``config.block_chunks``), never inferred from the
    keys: a partial dict may hold only some chunks, and its highest chunk index says nothing about the model.
    """
    if block_chunks < 1 or depth % block_chunks:
        raise CheckpointError(f"the model configuration has {block_chunks} block chunks, which does not divide its "
                              f"depth {depth}; fix `block_chunks` in the preset")
    if not any(_CHUNKED.match(k) for k in state_dict):
        return dict(state_dict), 1
    per_chunk = depth // block_chunks
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _CHUNKED.match(key)
        if m is not None and int(m.group(1)) >= block_chunks:
            raise CheckpointError(f"key {key!r} names block chunk {m.group(1)}, but the model configuration has "
                                  f"{block_chunks} block chunks of {per_chunk} blocks (depth {depth}); the checkpoint "
                                  "does not match the preset")
        name = flat_block_key(key, per_chunk)
        if name in out:
            raise CheckpointError(f"checkpoint names block tensor {name!r} twice (chunked and flat spellings)")
        out[name] = value
    return out, block_chunks


@dataclass
class LoadReport:
    """What :func:`load_infinity_state_dict` did besides copying tensors."""

    block_chunks: int
    dropped: list[str] = field(default_factory=list)
    zero_buffers_filled: list[str] = field(default_factory=list)
    cfg_uncond_rows: int | None = None


def load_infinity_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load an official (or our own) Infinity state dict into ``model``, strictly.

    Raises :class:`CheckpointError` listing every missing, unexpected and wrongly shaped key.
    """
    depth = len(model.blocks)
    sd, chunks = flatten_block_keys(state_dict, depth, int(getattr(model.config, "block_chunks", 1)))
    report = LoadReport(block_chunks=chunks)
    for key in LEGACY_KEYS:
        if sd.pop(key, None) is not None:
            report.dropped.append(key)
    own = model.state_dict()

    for key in [k for k in sd if k.endswith("zero_k_bias")]:
        if torch.count_nonzero(sd[key]):
            raise CheckpointError(f"checkpoint buffer {key!r} must be all zeros (it is a constant of the model)")
    for key in own:
        if key.endswith("zero_k_bias") and key not in sd:
            sd[key] = own[key]
            report.zero_buffers_filled.append(key)

    if "cfg_uncond" in sd:
        ckpt, mine = sd["cfg_uncond"], own["cfg_uncond"]
        report.cfg_uncond_rows = int(ckpt.shape[0])
        if ckpt.ndim == 2 and ckpt.shape[1] == mine.shape[1] and ckpt.shape[0] != mine.shape[0]:
            # The reference keeps a shorter table's rows and completes it with the model's own (seeded) rows.
            n = min(ckpt.shape[0], mine.shape[0])
            sd["cfg_uncond"] = torch.cat([ckpt[:n].to(mine), mine[n:]], dim=0)

    # Name checkpoint-side problems with the checkpoint's own spelling of the key.
    spelled = {flat_block_key(k, depth // chunks) if chunks > 1 else k: k for k in state_dict}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(spelled.get(k, k) for k in set(sd) - set(own))
    wrong = [(spelled.get(k, k), tuple(sd[k].shape), tuple(own[k].shape)) for k in sorted(set(sd) & set(own))
             if sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(format_key_problems("Infinity checkpoint", missing, unexpected, wrong))
    model.load_state_dict(sd, strict=True)
    return report


def to_official_state_dict(model: nn.Module, block_chunks: int | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the official names (``block_chunks.{c}.module.{j}`` when ``block_chunks > 1``)."""
    depth = len(model.blocks)
    chunks = int(block_chunks if block_chunks is not None else getattr(model.config, "block_chunks", 1))
    if chunks < 1 or depth % chunks:
        raise ValueError(f"`block_chunks` must divide the depth {depth}, got {chunks}")
    out = {}
    for key, value in model.state_dict().items():
        out[chunked_block_key(key, depth // chunks) if chunks > 1 else key] = value.detach()
    return out
