"""Hyperparameters of the method, with the paper's defaults, and the two settings profiles.

``default``: correct, single GPU, fast — iteration counts are optimizer updates (10 prompt-tuning, 50 LoRA).
``reference``: reproduces the published code path where it differs (docs/method.md, "Where we differ"): q/v biases ignored, 9 + 49
updates, LoRA effective batch 2. Condition dropout and DropPath are on in both, as in the published runs.

Speed/memory settings change how the training stages run, not what they compute: ``checkpointing`` (activation
checkpointing of the transformer blocks: ``"auto"`` sizes it to the GPU memory, see
:func:`editinfinity.edit.training.checkpoint_block_count`), ``low_memory`` (every block checkpointed, T5 offloaded
after prepare, cached GPU memory released between stages), ``compile`` (``torch.compile`` of the training blocks:
``"auto"`` = on CUDA only, see :func:`compile_enabled`) and ``attention_backend`` (the SDPA kernel the training stages
prefer on CUDA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import InvalidCaseError

CHECKPOINTING_MODES = ("auto", "none", "all")
COMPILE_MODES = ("auto", "on", "off")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
#: The smoothing band settings: edit.mask.BAND_CHOICES, spelled out (settings import no torch; a test compares them).
BAND_SETTINGS = ("scaled", "reference", "auto")


def parse_checkpointing(value: str | int) -> str | int:
    """``"auto"``, ``"none"``, ``"all"`` or a number of blocks (an int or a string of digits) -> canonical value."""
    if isinstance(value, bool):
        raise InvalidCaseError(f"checkpointing must be auto, none, all or a number of blocks, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidCaseError(f"checkpointing must be >= 0 blocks, got {value}")
        return value
    text = str(value).strip().lower()
    if text in CHECKPOINTING_MODES:
        return text
    if text.isdigit():
        return int(text)
    raise InvalidCaseError(f"checkpointing must be auto, none, all or a number of blocks, got {value!r}")


def parse_compile(value: str | bool) -> str:
    """``"auto"``, ``"on"``/``True`` or ``"off"``/``False`` (also ``"true"``/``"false"``/``"1"``/``"0"``) -> canonical."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    text = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(text, text)
    if text not in COMPILE_MODES:
        raise InvalidCaseError(f"compile must be auto, on or off, got {value!r}")
    return text


def compile_enabled(value: str | bool, device_type: str) -> bool:
    """Whether the training blocks run through ``torch.compile``: ``"auto"`` on CUDA (the first update of a process
    compiles, or loads the persistent compile cache), never on the CPU (compiling there costs more than it saves
    at the tiny and toy sizes, and keeps CI fast); ``"on"``/``"off"`` everywhere."""
    mode = parse_compile(value)
    return mode == "on" or (mode == "auto" and device_type == "cuda")


@dataclass
class EditSettings:
    # Stage B, prompt tuning: learned rows appended after the styled prompt (raw T5 space, zero init).
    prompt_iters: int = 10
    style_rows: int = 20
    # Stage C, LoRA on every block's fc1/fc2.
    lora_iters: int = 50
    lora_rank: int = 4
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_batch: int = 1
    kl_weight: float = 2e-7
    # Shared by both training stages: AdamW with decoupled weight decay, constant lr, global-norm clipping.
    # None: the preset's rate (Preset.edit_lr): 4.6875e-5 = 6e-3 * 2 / 256, the reference's tblr * global
    # batch / 256, for the Infinity family.
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.97)
    eps: float = 1e-8
    weight_decay: float = 0.005
    grad_clip: float = 5.0
    # Bitwise self-correction of the teacher-forcing inputs: flip probability ~ U{0, .01, .., strength} per scale.
    noise_strength: float = 0.3
    noise_layers: int | None = None  # None: every scale
    # Stochastic regularisers active in the published training (its model trains in training mode).
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    # Stage E: mask threshold between min and max of the attention map (None: the preset's, Preset.mask_threshold:
    # the method's 0.5, 0.3 for the toy model; see mask_threshold); smoothing band "scaled" (the reference's 1- and
    # 4-cell distances as fractions of a 64-cell side: identical at 1M), "reference" (cells on any grid) or "auto",
    # the default: both where they differ (below 1M), keeping the edit the model scores closest to the edit prompt
    # (edit.likelihood); at 1M the one published band, at no extra cost.
    threshold: float | None = None
    band: str = "auto"
    # Hysteresis of the automatic mask: keep only selected regions that reach this relative level somewhere (stray
    # weak cells are dropped); 0 (any value <= threshold) keeps every cell above `threshold`, as the reference does.
    core: float = 0.0
    # Cleanup of the automatic mask (edit.mask.clean_mask): fill its holes; drop 8-connected regions smaller than
    # this fraction of the grid's cells (the largest region always stays). Off = the reference's raw threshold.
    fill_holes: bool = False
    min_region: float = 0.0
    # Output pixels (edit.pixels): the source's own pixels where the pixel-level keep weight is 1, the decoded edit
    # where it is 0, a smooth mix through the band. Off: the decode of the blended codes, as the published method.
    keep_pixels: bool = True
    # Sampling (stage G and plain generation).
    cfg: float = 4.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97
    seed: int = 0
    # q/v biases: "upstream" uses them (the weights were trained with them), "editinfinity" ignores them.
    bias_mode: str = "upstream"
    # Speed and memory (module docstring): activation checkpointing of the training blocks, the low-memory setting
    # and torch.compile of the training blocks ("auto": on CUDA; a process's first update compiles, or loads the
    # persistent cache under $EDITINFINITY_CACHE: see models/compile_cache.py).
    checkpointing: str | int = "auto"
    low_memory: bool = False
    compile: str | bool = "auto"
    # SDPA kernel preferred by the training stages on CUDA ("auto": PyTorch's choice); others fall back if unusable.
    attention_backend: str = "auto"
    profile: str = "default"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_profile(cls, profile: str = "default", **overrides) -> EditSettings:
        """Settings of a named profile with explicit overrides (None values are ignored)."""
        base = {"default": {}, "reference": {"prompt_iters": 9, "lora_iters": 49, "lora_batch": 2,
                                             "bias_mode": "editinfinity", "band": "reference",
                                             "keep_pixels": False}}
        if profile not in base:
            raise InvalidCaseError(f"unknown settings profile {profile!r}; choose default or reference")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise InvalidCaseError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        values = {**base[profile], **{k: v for k, v in overrides.items() if v is not None}, "profile": profile}
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        if self.prompt_iters < 0 or self.lora_iters < 0:
            raise InvalidCaseError("--prompt-iters and --lora-iters must be >= 0")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise InvalidCaseError(f"--threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.core <= 1.0:
            raise InvalidCaseError(f"--core-threshold must be in [0, 1], got {self.core}")
        if not 0.0 <= self.min_region < 1.0:
            raise InvalidCaseError(f"--min-region must be a fraction of the grid in [0, 1), got {self.min_region}")
        if self.band not in BAND_SETTINGS:
            raise InvalidCaseError(f"--band must be one of {', '.join(BAND_SETTINGS)}, got {self.band!r}")
        if self.bias_mode not in ("upstream", "editinfinity"):
            raise InvalidCaseError(f"bias_mode must be upstream or editinfinity, got {self.bias_mode!r}")
        if self.lora_batch < 1:
            raise InvalidCaseError("lora_batch must be >= 1")
        self.checkpointing = parse_checkpointing(self.checkpointing)
        self.compile = parse_compile(self.compile)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InvalidCaseError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                                   f"got {self.attention_backend!r}")

    def mask_threshold(self, preset: str | None) -> float:
        """``threshold``, or when unset the automatic mask's threshold of ``preset`` (``Preset.mask_threshold``)."""
        from ..models.presets import effective_mask_threshold

        return effective_mask_threshold(self.threshold, preset)

    @property
    def effective_checkpointing(self) -> str | int:
        """``checkpointing`` with ``low_memory`` applied: low memory turns ``"auto"`` into ``"all"``."""
        mode = parse_checkpointing(self.checkpointing)
        return "all" if self.low_memory and mode == "auto" else mode

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def stage_dict(self) -> dict:
        """What a stage other than the mask stage records in its ``stage.json``: :meth:`to_dict` without
        ``threshold``, which only the mask stage uses (it records the value it cut at and where that came from), so
        a learning or generate stage's record never shows an unset ``threshold: null`` a reader could take for the
        value used."""
        d = self.to_dict()
        d.pop("threshold")
        return d

    def effective_dict(self, preset: str | None) -> dict:
        """:meth:`to_dict` with what a setting left unset resolves to for ``preset``: the mask threshold (what
        summaries, reports and benchmark records show: the number used, never ``None``)."""
        return {**self.to_dict(), "threshold": self.mask_threshold(preset)}

    @classmethod
    def from_dict(cls, d: dict) -> EditSettings:
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)
