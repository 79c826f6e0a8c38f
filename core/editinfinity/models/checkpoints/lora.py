"""The reference's LoRA files -> peft's adapter keys (the published code saves ``block_chunks.c.module.j.ffn.fc1.lora_A``
tensors, possibly flattened to 1-D; see ``infinity`` for the block naming)."""

from __future__ import annotations

import torch

from ...errors import CheckpointError
from .infinity import flatten_block_keys


def reference_lora_to_peft(tensors: dict[str, torch.Tensor], rank: int, depth: int,
                           block_chunks: int) -> dict[str, torch.Tensor]:
    """Map the reference's LoRA file (``block_chunks.c.module.j.ffn.fc1.lora_A``, possibly flat 1-D) to peft keys.

    ``depth`` and ``block_chunks`` come from the model configuration: the file may hold any subset of the blocks.
    """
    flat, _ = flatten_block_keys(tensors, depth=depth, block_chunks=block_chunks)
    out = {}
    for name, t in flat.items():
        if name.endswith("lora_A"):
            out[name + ".weight"] = t.reshape(rank, -1).float()
        elif name.endswith("lora_B"):
            out[name + ".weight"] = t.reshape(-1, rank).float()
        else:
            raise CheckpointError(f"unexpected key {name!r} in a reference LoRA file")
    return out
