"""Training data from the toy world: seeded scene batches (sampled in worker processes) and a batched renderer.

Seeds (:mod:`.scenes`). Training batch ``step`` of stream ``stream`` is ``toyworld.sample_scene`` drawn ``batch``
times from ``np.random.default_rng([TRAIN_TAG, seed, stream, step])``, a pure function of those numbers, so a
resumed run sees exactly the batches it would have seen. Evaluation uses integer seeds (``sample_scene(s)`` is
``default_rng([s])``, ``make_edit_case(s)`` is ``default_rng([s, 0x7E1D])``); numpy pads entropy with zeros, so
those equal a training stream only if ``stream`` were 0, and training streams are numbered from 1: no evaluation
scene is ever a training scene.

Rendering. :func:`render_batch` rasterises a batch of scenes on the training device with the toy world's
pixel-centre rule in float64, so clean pictures are bit-identical to ``toyworld.render``; pixel noise is drawn
from a torch generator (same distribution as ``render(noise=...)``, different draws).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch

from .. import toyworld
from .scenes import (  # noqa: F401  re-exported: the seed conventions live with the sampler
    CALIBRATION_EDIT_SEED_BASE,
    CALIBRATION_SEED_BASE,
    EDIT_SEED_BASE,
    HELDOUT_SEED_BASE,
    SEED_SETS,
    TEXT_STREAM,
    TRAIN_TAG,
    TRANSFORMER_STREAM,
    VAE_STREAM,
    exit_with_parent,
    heldout_scenes,
    scene_batch,
    stream_rng,
)

log = logging.getLogger(__name__)

_KIND_INDEX = {k: i for i, k in enumerate(toyworld.KINDS)}
_SQUARE, _CIRCLE, _TRIANGLE = (_KIND_INDEX[k] for k in ("square", "circle", "triangle"))


class SceneStream:
    """Scene batches for consecutive steps, sampled ahead by a pool of processes (or in-process: ``workers=0``).

    ``get(step)`` must be called with consecutive steps starting at ``start``; the pool keeps ``prefetch``
    batches in flight. Use as a context manager (or call :meth:`close`) so the processes end with the run.
    """

    def __init__(self, seed: int, stream: int, batch: int, *, start: int = 0, width: int = 256, height: int = 256,
                 workers: int = 0, prefetch: int | None = None, two_shape_prob: float | None = None):
        self.seed, self.stream, self.batch = int(seed), int(stream), int(batch)
        self.width, self.height = int(width), int(height)
        self.two_shape_prob = two_shape_prob
        self.next_step = int(start)
        # Never more processes than spare cores: the training process needs one.
        self.workers = min(max(0, int(workers)), max(1, (os.cpu_count() or 2) - 1))
        self.prefetch = prefetch if prefetch is not None else 3 * self.workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: collections.deque[tuple[int, Future]] = collections.deque()
        self._submitted = self.next_step
        if self.workers:
            # spawn: the workers never share the parent's CUDA context or threads.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=exit_with_parent, initargs=(os.getpid(),))
            self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) < self.prefetch:
            step = self._submitted
            fut = self._pool.submit(scene_batch, self.seed, self.stream, step, self.batch, self.width, self.height,
                                     self.two_shape_prob)
            self._pending.append((step, fut))
            self._submitted += 1

    def get(self, step: int) -> list[toyworld.Scene]:
        """The scenes of training step ``step`` (the next one in order)."""
        if step != self.next_step:
            raise ValueError(f"SceneStream expected step {self.next_step}, got {step}")
        self.next_step += 1
        if self._pool is None:
            return scene_batch(self.seed, self.stream, step, self.batch, self.width, self.height,
                               self.two_shape_prob)
        got, fut = self._pending.popleft()
        scenes = fut.result()  # a worker's exception surfaces here, with its traceback
        if got != step:
            raise RuntimeError(f"scene pool out of order: wanted step {step}, got {got}")
        self._fill()
        return scenes

    def close(self) -> None:
        """Stop the worker processes (pending batches are dropped)."""
        if self._pool is not None:
            for _, fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    def __enter__(self) -> SceneStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# rendering


def scene_tensors(scenes: Sequence[toyworld.Scene], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Scene parameters as tensors: ``bg (B, 3)`` uint8 colours, per shape slot ``kind``, ``rgb``, ``cx``, ``cy``,
    ``size`` and ``valid`` (slots past a scene's last shape are invalid)."""
    if not scenes:
        raise ValueError("no scenes to render")
    width, height = scenes[0].width, scenes[0].height
    if any((s.width, s.height) != (width, height) for s in scenes):
        raise ValueError("render_batch needs scenes of one size")
    slots = max(len(s.shapes) for s in scenes)
    B = len(scenes)
    kind = np.zeros((B, slots), np.int64)
    rgb = np.zeros((B, slots, 3), np.uint8)
    geom = np.zeros((3, B, slots), np.float64)
    valid = np.zeros((B, slots), bool)
    bg = np.array([toyworld.PALETTE[s.background] for s in scenes], np.uint8)
    for b, s in enumerate(scenes):
        for j, sh in enumerate(s.shapes):
            kind[b, j] = _KIND_INDEX[sh.kind]
            rgb[b, j] = toyworld.PALETTE[sh.colour]
            geom[:, b, j] = (sh.cx, sh.cy, sh.size)
            valid[b, j] = True
    t = {"bg": bg, "kind": kind, "rgb": rgb, "cx": geom[0], "cy": geom[1], "size": geom[2], "valid": valid}
    out = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in t.items()}
    out["width"], out["height"] = torch.tensor(width), torch.tensor(height)
    return out


def render_batch(scenes: Sequence[toyworld.Scene], device: torch.device | str = "cpu",
                 noise: float | torch.Tensor = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pictures of ``scenes`` as ``(B, 3, H, W)`` float32 in [-1, 1] on ``device`` (``x/255`` then ``2x - 1``).

    Shapes cover the pixel centres exactly as ``toyworld.render`` (float64, same comparisons), so without noise
    the result equals ``case.image_to_tensor(toyworld.render(scene))``. ``noise`` is the std of gaussian pixel
    noise in 0-255 units, a number or a ``(B,)`` tensor (per picture); the noisy values are rounded and clipped
    like ``render(noise=...)``. Noise draws come from ``generator`` (on ``device``).
    """
    device = torch.device(device)
    t = scene_tensors(scenes, device)
    W, H = int(t["width"]), int(t["height"])
    xs = torch.arange(W, dtype=torch.float64, device=device).add_(0.5).view(1, 1, W)
    ys = torch.arange(H, dtype=torch.float64, device=device).add_(0.5).view(1, H, 1)
    img = t["bg"].view(-1, 3, 1, 1).expand(-1, 3, H, W).clone()  # uint8
    for j in range(t["kind"].shape[1]):
        cx, cy = t["cx"][:, j].view(-1, 1, 1), t["cy"][:, j].view(-1, 1, 1)
        half = (t["size"][:, j] / 2).view(-1, 1, 1)
        dx, dy = xs - cx, ys - cy
        kind = t["kind"][:, j].view(-1, 1, 1)
        square = (dx.abs() <= half) & (dy.abs() <= half)
        circle = dx * dx + dy * dy <= half * half
        depth = dy + half
        triangle = (depth >= 0) & (dy <= half) & (dx.abs() <= depth / 2)
        mask = torch.where(kind == _SQUARE, square, torch.where(kind == _CIRCLE, circle, triangle))
        mask &= t["valid"][:, j].view(-1, 1, 1)
        img = torch.where(mask.unsqueeze(1), t["rgb"][:, j].view(-1, 3, 1, 1), img)
    x = img.to(torch.float32)
    if isinstance(noise, torch.Tensor) or noise > 0:
        std = torch.as_tensor(noise, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
        gen_device = generator.device if generator is not None else device
        z = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
        x = torch.round(x + z * std).clamp_(0, 255)
    x = x.div(255)
    return x.add(x).add_(-1)
