"""The stage sequence of one edit, in one place, and the one set of timing keys every report uses.

:func:`run_stages` runs the six steps in order (docs/method.md): 1. prepare, 2. prompt tuning, 3. LoRA,
4. attention (mode auto), 5. mask (modes auto and mask), 6. generate. What a step does is the caller's
:class:`Steps`: ``edit.run.run_edit`` (the CLI, the batch worker, the fused KFP component) passes steps over
stage directories, ``EditInfinityPipeline.edit`` passes the in-memory stage functions, and
``edit.learned.learn`` runs steps 1-3 only. An edit of learned state gets the prompt rows and the adapter from
step 1 (``Steps.learned``) and skips steps 2 and 3.

Every step is timed by a :class:`StageTimer` under its :data:`STAGES` key; the same keys land in
``summary.json`` ``seconds``, ``EditOutput.seconds``, ``LearnedState.seconds``, the batch worker's per-case
status, the report page's timing bar and the KFP Metrics of the fused component.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Timing keys, in the order they run: model loading (only where the run loads the models itself), learning
#: through a learned-state cache, then the six steps.
STAGES = ("load_models", "learn", "prepare", "tune_prompt", "train_lora", "attention", "mask", "generate")
#: The steps of :func:`run_stages` (the last six of ``STAGES``).
STEPS = STAGES[2:]
#: The peak of allocated GPU memory in GiB (CUDA only), recorded beside the seconds (not a time).
PEAK_MEMORY = "peak_gpu_memory_gb"
#: Entries of a ``seconds`` record that are not stages: the sum of the stages (``load_models`` left out) and
#: ``PEAK_MEMORY``.
NOT_STAGES = ("total", PEAK_MEMORY)


class StageTimer:
    """Seconds per stage (rounded to 0.1 ms) and, on CUDA, the running peak of allocated GPU memory after each.

    ``release_memory`` (the low-memory setting) gives cached GPU blocks back after every stage, inside its time.
    """

    def __init__(self, models=None, *, release_memory: bool = False):
        self.models = models
        self.release_memory = release_memory
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, float] = {}  # GiB, after each stage (CUDA only)

    @property
    def cuda(self) -> bool:
        return self.models is not None and self.models.device.type == "cuda"

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` as stage ``name``; returns its result."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; timing keys are {', '.join(STAGES)}")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if name == "load_models":
            self.models = result
        if self.release_memory and self.models is not None:
            self.models.release_cached_memory()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.memory[name] = _peak_gib()
        self.seconds[name] = round(time.perf_counter() - start, 4)
        return result

    def record(self) -> dict[str, float]:
        """The stages' seconds with ``total`` (model loading left out) and, on CUDA, ``peak_gpu_memory_gb``."""
        out = dict(self.seconds)
        out["total"] = round(sum(v for k, v in self.seconds.items() if k != "load_models"), 4)
        if self.cuda:
            out[PEAK_MEMORY] = _peak_gib()
        return out


def _peak_gib() -> float:
    import torch  # only on CUDA: the constants above are importable without torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


@dataclass(frozen=True)
class Steps:
    """What each step of :func:`run_stages` does; results are whatever the caller's steps return (stage
    directories or in-memory values) and are passed on unchanged.

    ``learned``: ``prepare`` returns ``(case, prompt, lora)`` from learned state and steps 2 and 3 do not run.
    """

    prepare: Callable[[], Any]
    tune_prompt: Callable[[Any], Any] | None = None
    train_lora: Callable[[Any, Any], Any] | None = None
    attention: Callable[[Any], Any] | None = None
    mask: Callable[[Any, Any], Any] | None = None
    generate: Callable[[Any, Any, Any, Any], Any] | None = None
    learned: bool = False


@dataclass
class StageResults:
    """What each step returned (None for a step that did not run)."""

    case: Any
    prompt: Any
    lora: Any
    attention: Any = None
    mask: Any = None
    generate: Any = None


def run_stages(steps: Steps, *, mode: str, timer: StageTimer, last: str = "generate") -> StageResults:
    """Run the steps of an edit in mode ``mode`` up to and including ``last`` (a name of :data:`STEPS`)."""
    if last not in STEPS:
        raise ValueError(f"last must be one of {', '.join(STEPS)}, got {last!r}")
    upto = STEPS.index(last)
    # 1. prepare
    prepared = timer("prepare", steps.prepare)
    if steps.learned:
        case, prompt, lora = prepared
    else:
        case, prompt, lora = prepared, None, None
        # 2. prompt tuning
        if upto >= STEPS.index("tune_prompt"):
            prompt = timer("tune_prompt", steps.tune_prompt, case)
        # 3. LoRA
        if upto >= STEPS.index("train_lora"):
            lora = timer("train_lora", steps.train_lora, case, prompt)
    out = StageResults(case=case, prompt=prompt, lora=lora)
    # 4. attention
    if mode == "auto" and upto >= STEPS.index("attention"):
        out.attention = timer("attention", steps.attention, case)
    # 5. mask
    if mode != "whole" and upto >= STEPS.index("mask"):
        out.mask = timer("mask", steps.mask, case, out.attention)
    # 6. generate
    if upto >= STEPS.index("generate"):
        out.generate = timer("generate", steps.generate, case, prompt, lora, out.mask)
    return out
