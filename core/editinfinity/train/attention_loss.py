"""Auxiliary training loss of the toy model: the colour and shape words' cross-attention should light their object.

The automatic mask (``edit/attention.py``, ``edit/mask.py``) thresholds the target word's cross-attention map:
softmax over the text rows, mean over the word's tokens and the heads, each scale's map resized bilinearly to the
last grid, mean over blocks and scales. A toy scene knows where each of its objects is, so training can supervise
exactly that map: for every colour and shape word of the caption, the map normalised to a distribution over the
grid's cells should match the object's visible area (its pixel coverage per cell, normalised), measured by the KL
divergence ``KL(target || map)`` (zero when the map is the object's coverage up to a constant factor; the background
words are not supervised). It is our own loss for our own toy model, not part of the published method
(docs/method.md); it is off unless ``TransformerConfig.attn_loss_weight`` is positive.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import toyworld
from ..models import schedules
from ..toyworld.scene import _shape_on_grid

#: Supervised words per caption: colour and shape of each of at most two objects, in caption order.
WORDS_PER_OBJECT = 2
MAX_OBJECTS = 2
#: Samples per cell side when measuring an object's coverage of a latent cell.
SUBSAMPLE = 4


def caption_word_spans(scene: toyworld.Scene) -> list[tuple[int, int, int]]:
    """``(object index, start, end)`` character spans of each object's colour word and shape word in
    ``toyworld.caption(scene)``, in caption order."""
    spans: list[tuple[int, int, int]] = []
    pos = 0
    text = ""
    for i, s in enumerate(scene.shapes):
        lead = "a " if i == 0 else " and a "
        text += lead
        pos = len(text)
        spans.append((i, pos, pos + len(s.colour)))
        text += s.colour + " "
        pos = len(text)
        spans.append((i, pos, pos + len(s.kind)))
        text += s.kind
    text += f" on a {scene.background} background"
    if text != toyworld.caption(scene):
        raise AssertionError(f"caption layout changed: {text!r} != {toyworld.caption(scene)!r}")
    return spans


def word_token_weights(tokenizer, scenes: Sequence[toyworld.Scene], rows: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    """Which text rows make up each supervised word, for captions whose tokens start the text rows.

    Returns ``weights`` (B, rows, W) float32 (``1/n`` on the word's ``n`` tokens, so ``attn @ weights`` is the
    mean over the word's tokens), ``objects`` (B, W) int64 (the object each word names) and ``valid`` (B, W) bool
    (False for the word slots of absent objects). ``W = MAX_OBJECTS * WORDS_PER_OBJECT``. Token indices come
    from the fast tokenizer's character offsets, as :func:`~editinfinity.models.text.target_token_range` finds
    them; a suffix after the caption (the style suffix, appended rows) leaves them unchanged.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the attention loss needs a fast tokenizer (character offsets)")
    n_words = MAX_OBJECTS * WORDS_PER_OBJECT
    B = len(scenes)
    weights = torch.zeros(B, rows, n_words)
    objects = torch.zeros(B, n_words, dtype=torch.int64)
    valid = torch.zeros(B, n_words, dtype=torch.bool)
    enc = tokenizer([toyworld.caption(s) for s in scenes], return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    for b, scene in enumerate(scenes):
        if len(scene.shapes) > MAX_OBJECTS:
            raise ValueError(f"the attention loss supervises at most {MAX_OBJECTS} objects per scene")
        offsets, special = enc["offset_mapping"][b], enc["special_tokens_mask"][b]
        for w, (obj, c0, c1) in enumerate(caption_word_spans(scene)):
            hits = [t for t, ((s, e), sp) in enumerate(zip(offsets, special, strict=True))
                    if not sp and s < c1 and e > c0 and t < rows]
            if not hits:
                continue
            weights[b, hits, w] = 1.0 / len(hits)
            objects[b, w] = obj
            valid[b, w] = True
    return weights, objects, valid


@functools.lru_cache(maxsize=65536)
def _scene_coverage(scene: toyworld.Scene, grid: tuple[int, int], sub: int) -> np.ndarray:
    hK, wK = grid
    xs = (np.arange(wK * sub, dtype=np.float64)[None, :] + 0.5) * (scene.width / (wK * sub))
    ys = (np.arange(hK * sub, dtype=np.float64)[:, None] + 0.5) * (scene.height / (hK * sub))
    masks = [np.broadcast_to(_shape_on_grid(s.kind, s.cx, s.cy, s.size, xs, ys), (hK * sub, wK * sub))
             for s in scene.shapes]
    out = np.zeros((MAX_OBJECTS, hK, wK), dtype=np.float32)
    for i, m in enumerate(masks):
        visible = m.copy()
        for later in masks[i + 1:]:  # shapes drawn later occlude it (toyworld.render_mask)
            visible &= ~later
        out[i] = visible.reshape(hK, sub, wK, sub).mean(axis=(1, 3))
    return out


def object_coverage(scenes: Sequence[toyworld.Scene], grid: tuple[int, int], sub: int = SUBSAMPLE) -> torch.Tensor:
    """(B, MAX_OBJECTS, hK, wK) share of each latent cell covered by each object's visible pixels (``sub`` x
    ``sub`` samples per cell; zeros for absent objects)."""
    return torch.from_numpy(np.stack([_scene_coverage(s, tuple(grid), sub) for s in scenes]))


def resize_matrix(schedule) -> torch.Tensor:
    """(L, hK*wK) float32: row ``l`` is what token ``l``'s map value contributes to the last grid, i.e. per scale
    the bilinear resize (align_corners=False) of :class:`~editinfinity.models.attention_maps.AttentionMapCollector`,
    divided by the number of scales (so ``maps @ R`` is the mean over scales of the resized maps)."""
    sched = schedules.normalize_schedule(schedule)
    grid = schedules.last_grid(sched)
    parts = []
    for _, h, w in sched:
        eye = torch.eye(h * w).view(h * w, 1, h, w)
        parts.append(F.interpolate(eye, size=grid, mode="bilinear", align_corners=False).view(h * w, -1))
    return torch.cat(parts, dim=0) / len(sched)


@functools.lru_cache(maxsize=8)
def _cached_resize(sched: tuple) -> torch.Tensor:
    return resize_matrix(sched)


class CrossAttentionTargets:
    """Batched attention probe that accumulates every supervised word's map and gives the KL loss.

    Pass as ``attention_probe`` to a teacher-forced (training) forward, then call :meth:`loss`. ``weights``,
    ``objects``, ``valid``: from :func:`word_token_weights` (``weights`` may have more rows than the batch's text;
    the first ``T`` are used); ``coverage``: from :func:`object_coverage`. Samples whose text condition dropout
    replaced are left out (their rows say nothing about the picture).
    """

    batched = True

    def __init__(self, schedule, weights: torch.Tensor, objects: torch.Tensor, valid: torch.Tensor,
                 coverage: torch.Tensor):
        sched = tuple(tuple(int(v) for v in s) for s in schedules.normalize_schedule(schedule))
        self.resize = _cached_resize(sched).to(weights.device)
        self.weights = weights.float()
        B, W = objects.shape
        target = coverage.flatten(2).float().gather(1, objects[:, :, None].expand(B, W, coverage[0, 0].numel()))
        mass = target.sum(-1)
        self.valid = valid & (mass > 0)
        self.target = target / mass.clamp_min(1e-12)[..., None]
        self.keep = self.valid
        self._sum: torch.Tensor | None = None
        self._count = 0

    def on_condition(self, cond) -> None:
        if cond.dropped is not None:
            self.keep = self.valid & ~torch.tensor(cond.dropped, dtype=torch.bool, device=self.valid.device)[:, None]

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
        B, L, H, hd = q.shape
        T = k.shape[1]
        if self.resize.shape[0] != L:
            raise ValueError(f"probe built for {self.resize.shape[0]} tokens, got {L}")
        logits = torch.einsum("blhd,bthd->bhlt", q.float(), k.float()) * (1.0 / math.sqrt(hd))
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask.bool(), float("-inf"))
        attn = logits.softmax(dim=-1)  # (B, H, L, T)
        words = torch.einsum("bhlt,btw->bwl", attn, self.weights[:, :T]) / H  # mean over heads and word tokens
        maps = words @ self.resize  # (B, W, hK*wK): mean over scales of the resized maps
        self._sum = maps if self._sum is None else self._sum + maps
        self._count += 1

    def maps(self) -> torch.Tensor:
        """(B, W, hK*wK) mean map of every word over blocks and scales (the automatic mask's input)."""
        if self._sum is None:
            raise RuntimeError("no attention collected: pass the probe as `attention_probe` to a forward pass")
        return self._sum / self._count

    def loss(self) -> torch.Tensor:
        """Mean ``KL(target || map / sum(map))`` over the kept words (0 when none is kept)."""
        a = self.maps()
        p = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        t = self.target
        kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-12)) - torch.log(p.clamp_min(1e-12))), 0.0).sum(-1)
        keep = self.keep.float()
        return (kl * keep).sum() / keep.sum().clamp_min(1.0)
