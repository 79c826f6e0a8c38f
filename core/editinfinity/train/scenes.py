"""Seeded toy-world scene batches for training, without torch (so scene-sampling worker processes stay light).

Training batch ``step`` of stream ``stream`` is ``toyworld.sample_scene`` drawn ``batch`` times from
``np.random.default_rng([TRAIN_TAG, seed, stream, step])``. Evaluation uses integer seeds (``sample_scene(s)`` is
``default_rng([s])``, ``make_edit_case(s)`` is ``default_rng([s, 0x7E1D])``); numpy pads entropy with zeros, so
those could equal a training stream only if ``stream`` were 0, and training streams are numbered from 1.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from .. import toyworld

#: First entropy word of every training stream (see the module docstring).
TRAIN_TAG = 0x7EA1
#: Streams: the VAE and the transformer draw independent scenes; 3 is the transformer's caption/text variants.
VAE_STREAM, TRANSFORMER_STREAM, TEXT_STREAM = 1, 2, 3
#: Integer seeds of held-out scenes (evaluation and the training's final checks); never used by training.
HELDOUT_SEED_BASE = 1_000_000
#: Integer seeds of held-out edit cases (``toyworld.make_edit_case``).
EDIT_SEED_BASE = 2_000_000
#: Integer seeds of the calibration sets (scenes, edit cases): where a preset's inference defaults (sampling, mask
#: threshold) are chosen, so that the evaluation's held-out seeds above stay untouched by that choice. Never used by
#: training either (same argument as the held-out seeds).
CALIBRATION_SEED_BASE = 3_000_000
CALIBRATION_EDIT_SEED_BASE = 4_000_000
#: Seed bases of each named seed set: (scenes, edit cases).
SEED_SETS = {"heldout": (HELDOUT_SEED_BASE, EDIT_SEED_BASE),
             "calibration": (CALIBRATION_SEED_BASE, CALIBRATION_EDIT_SEED_BASE)}


def stream_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    """The numpy generator of one training batch (or of one step's text variants)."""
    if stream < 1:
        raise ValueError("training streams are numbered from 1 (stream 0 could coincide with evaluation seeds)")
    return np.random.default_rng([TRAIN_TAG, int(seed), int(stream), int(step)])


def scene_batch(seed: int, stream: int, step: int, batch: int, width: int = 256, height: int = 256,
                two_shape_prob: float | None = None) -> list[toyworld.Scene]:
    """Training batch ``step`` of ``stream``: ``batch`` valid scenes.

    ``two_shape_prob`` is the share of two-shape scenes; None leaves the choice to ``toyworld.sample_scene`` (1 or
    2 shapes, equally likely, the world's own distribution and the one evaluation draws from).
    """
    rng = stream_rng(seed, stream, step)
    if two_shape_prob is None:
        return [toyworld.sample_scene(rng, width, height) for _ in range(batch)]
    if not 0.0 <= two_shape_prob <= 1.0:
        raise ValueError(f"two_shape_prob must be in [0, 1], got {two_shape_prob}")
    return [toyworld.sample_scene(rng, width, height, n_shapes=2 if rng.random() < two_shape_prob else 1)
            for _ in range(batch)]


def heldout_scenes(n: int, width: int = 256, height: int = 256, base: int = HELDOUT_SEED_BASE) -> list[toyworld.Scene]:
    """``n`` evaluation scenes from the integer seeds ``base, base+1, ...`` (never used in training)."""
    return [toyworld.sample_scene(base + i, width, height) for i in range(n)]


def exit_with_parent(parent_pid: int, interval: float = 2.0) -> None:
    """Worker-process initializer: end this process when ``parent_pid`` is gone (a killed training run must not
    leave its samplers running)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
