"""Reading the head's bit logits: the reference's sampler and the training losses.

Logits are ``(B, L, 2d)``: token-major, then bit, then class (``view(B, L, d, 2)``; class 1 means bit = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import schedules


def sample_bits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one class per row of ``logits`` (B, n, 2) -> (B, n) long, as the reference's sampler does.

    top-k (clamped to 2): ``top_k=1`` keeps only the larger logit (greedy; exact ties stay random). top-p: after
    sorting ascending, classes whose cumulative probability is <= 1 - top_p are dropped (the larger one is always
    kept), i.e. the minority bit is removed when its probability is <= 1 - top_p. Then a single
    ``torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=generator)`` call, on the generator's
    device when it differs (a CPU generator gives the same draws on every device).
    """
    if top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"need `top_k` >= 0 and 0 <= `top_p` <= 1, got top_k={top_k}, top_p={top_p}")
    B, n, V = logits.shape
    logits = logits.float()
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, V)
    if generator is not None and generator.device != probs.device:
        idx = torch.multinomial(probs.to(generator.device), 1, replacement=True, generator=generator).to(probs.device)
    else:
        idx = torch.multinomial(probs, 1, replacement=True, generator=generator)
    return idx.view(B, n)

def bit_loss(logits: torch.Tensor, gt_bits: torch.Tensor, schedule, reweight: bool = True) -> torch.Tensor:
    """Per-bit 2-way cross-entropy averaged over the d bits, then over tokens and batch.

    ``reweight``: token weights ``sqrt(h_K w_K)/sqrt(h_k w_k)`` normalised to sum 1 (float64, as the reference, so
    the result is float64); otherwise the plain token mean (float32).
    """
    B, L, V = logits.shape
    if tuple(gt_bits.shape) != (B, L, V // 2):
        raise ValueError(f"`gt_bits` must be {(B, L, V // 2)} for logits {tuple(logits.shape)}, got {tuple(gt_bits.shape)}")
    ce = F.cross_entropy(logits.float().view(B, L, -1, 2).permute(0, 3, 1, 2), gt_bits.long(), reduction="none")
    per_token = ce.mean(dim=-1)  # (B, L)
    if reweight:
        weights = schedules.loss_weights(schedule).to(per_token.device)
        if weights.shape[0] != L:
            raise ValueError(f"schedule has {weights.shape[0]} tokens but the logits have {L}")
        return per_token.mul(weights[None]).sum(dim=-1).mean()
    return per_token.mul(1.0 / L).sum(dim=-1).mean()


def summed_bit_ce(logits: torch.Tensor, gt_bits: torch.Tensor) -> torch.Tensor:
    """``-sum log p(gt bit) / B`` over every token and bit: the LoRA stage's "KL" term (KL to one-hot labels)."""
    B, L, V = logits.shape
    logp = F.log_softmax(logits.float().view(B, L, -1, 2), dim=-1)
    return -logp.gather(-1, gt_bits.long().unsqueeze(-1)).sum() / B
