"""Load every model of a preset once per process: VAE, transformer, T5 encoder and tokenizer.

Storage precision (``load_models(dtype=...)``): on CUDA by default the frozen transformer's block matmul weights and
the T5 encoder are stored in bf16 (:meth:`Infinity.cast_frozen`: identical results under the bf16 autocast the
stages use, about half the GPU memory); the text path, norms, embeddings, head and the VAE stay float32, and
trained tensors (prompt rows, LoRA) are float32. On the CPU everything stays float32 (parity).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, InvalidCaseError
from .presets import Preset, bundled_weights_dir, default_preset_name, get_preset
from .text import resolve_pretrained

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """The models one edit needs, loaded once and passed to every stage."""

    vae: torch.nn.Module
    transformer: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module | None
    device: torch.device
    preset: str
    source: str
    #: "auto": bf16 autocast on GPU, float32 on CPU; "float32": float32 everywhere (slower, for checks).
    precision: str = "auto"
    #: Storage dtype of the transformer's frozen block matmul weights (see ``load_models(dtype=...)``).
    frozen_dtype: torch.dtype = torch.float32
    _host_text_encoder: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def identity(self) -> dict:
        """What stage artifacts record about the models that made them: the preset name and a digest of the
        transformer's and VAE's configurations (runtime switches such as ``bias_mode`` left out)."""
        configs = {}
        for name in ("transformer", "vae"):
            cfg = dict(getattr(getattr(self, name), "config", {}) or {})
            configs[name] = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "bias_mode"}
        digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return {"preset": self.preset, "config_digest": digest}

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.precision == "float32":
            return None
        if self.device.type == "cuda":
            return torch.bfloat16
        # A CPU bundle with bf16 block weights (tests, small machines) needs bf16 autocast to run them.
        return self.frozen_dtype if self.frozen_dtype != torch.float32 else None

    def autocast(self):
        """The autocast context of the stages; first puts the transformer's block weights in this bundle's storage
        dtype (float32 for ``precision="float32"``) when another bundle sharing the model changed them."""
        self.match_frozen_dtype()
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def match_frozen_dtype(self) -> None:
        """Cast the block weights to ``frozen_dtype`` (float32 when ``precision == "float32"``) if they differ."""
        want = torch.float32 if self.precision == "float32" else self.frozen_dtype
        cast = getattr(self.transformer, "cast_frozen", None)
        if cast is not None and self.transformer.frozen_dtype != want:
            cast(want)

    def offload_text_encoder(self) -> None:
        """Free the T5 encoder's GPU memory once the prompts are encoded (low-memory setting).

        The weights are frozen, so the first offload keeps a host copy (pinned on CUDA) and later offloads just drop
        the GPU tensors; :meth:`onload_text_encoder` copies them back.
        """
        enc = self.text_encoder
        if enc is None or self.device.type != "cuda":
            return
        host = self._host_text_encoder
        for name, t in [*enc.named_parameters(), *enc.named_buffers()]:
            if t.device.type == "cpu":
                continue
            copy = host.get(name)
            if copy is None or copy.shape != t.shape or copy.dtype != t.dtype:
                copy = host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
            t.data = copy
        torch.cuda.empty_cache()

    def onload_text_encoder(self) -> None:
        """Put the T5 encoder back on the bundle's device (after :meth:`offload_text_encoder`)."""
        enc = self.text_encoder
        if enc is None:
            return
        if self.device.type == "cpu":
            return
        for _, t in [*enc.named_parameters(), *enc.named_buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.to(self.device, non_blocking=True)

    def release_cached_memory(self) -> None:
        """Return cached, unused GPU blocks to the driver (between stages of the low-memory setting)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict:
        return {"preset": self.preset, "source": self.source, "device": str(self.device),
                "frozen_dtype": str(self.frozen_dtype).removeprefix("torch."),
                "transformer_config": dict(self.transformer.config), "vae_config": dict(self.vae.config)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a usable ``torch.device`` (the default when None); an unknown name, or a CUDA device this
    machine lacks, raises :class:`InvalidCaseError` naming the choices."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidCaseError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidCaseError(f"--device {device}: this machine has no usable CUDA GPU (or this torch was built "
                                   "without CUDA); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InvalidCaseError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 .. "
                                   f"cuda:{count - 1}")
    elif dev.type != "cpu":
        raise InvalidCaseError(f"--device {device}: editinfinity runs on cpu or cuda, not {dev.type}")
    return dev


def bundled_tokenizer_dir() -> Path:
    from importlib import resources

    path = Path(str(resources.files("editinfinity") / "presets" / "tokenizer"))
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"the bundled tokenizer is missing from {path}; reinstall editinfinity")
    return path


def _random_bundle(spec: Preset, device: torch.device, with_text_encoder: bool = True) -> tuple:
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from .bsq_vae import BSQVAE
    from .infinity import Infinity

    # Small presets are initialised on the CPU so their weights are the same on every machine; the large
    # random ones (benchmarks) directly on the target device, where a CPU init of billions of weights is slow.
    init_device = device if spec.name.endswith("-random") else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), init_device:
        torch.manual_seed(spec.seed)
        vae = BSQVAE(**spec.vae)
        transformer = Infinity(**spec.transformer)
        tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir(), legacy=True)
        text_encoder = None
        if with_text_encoder:  # built last: skipping it leaves the other models' random weights unchanged
            cfg = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                           layer_norm_epsilon=1e-6, tie_word_embeddings=True, **spec.text_encoder)
            text_encoder = T5EncoderModel(cfg)
    return vae, transformer, tokenizer, text_encoder


def _directory_bundle(directory: Path, with_text_encoder: bool = True) -> tuple:
    from transformers import AutoTokenizer, T5EncoderModel

    from .bsq_vae import BSQVAE
    from .infinity import Infinity

    missing = [p for p in ("transformer", "vae", "text_encoder", "tokenizer") if not (directory / p).is_dir()]
    if missing:
        raise CheckpointError(f"weights directory {directory} lacks {', '.join(missing)}/; write it with "
                              "`editinfinity convert` (see README 'Official weights')")
    vae = BSQVAE.from_pretrained(directory / "vae")
    transformer = Infinity.from_pretrained(directory / "transformer")
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", legacy=True)
    tokenizer.model_max_length = 512
    text_encoder = T5EncoderModel.from_pretrained(directory / "text_encoder") if with_text_encoder else None
    return vae, transformer, tokenizer, text_encoder


def resolve_frozen_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: bf16 on CUDA, float32 elsewhere; else ``"bfloat16"``/``"float32"`` or a torch dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        named = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
        if dtype not in named:
            raise ValueError(f"unknown model dtype {dtype!r}; choose auto, bfloat16 or float32")
        return named[dtype]
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"model dtype must be bfloat16 or float32, got {dtype}")
    return dtype


def load_models(preset: str | None = None, *, weights: str | None = None, device: str | torch.device | None = None,
                bias_mode: str | None = None, dtype: str | torch.dtype | None = None,
                text_encoder: bool = True) -> ModelBundle:
    """Build or load the models of ``preset`` (``weights`` overrides the preset's weight source).

    ``text_encoder=False`` skips T5 (``bundle.text_encoder`` is None): every stage after prepare reads the prompts'
    features from the case, so their processes (the pipeline's per-stage pods) need not load it.

    ``dtype``: storage of the frozen transformer block weights and of the T5 encoder (module docstring); ``None`` or
    ``"auto"`` = bf16 on CUDA, float32 on the CPU.
    """
    name = preset or default_preset_name()
    spec = get_preset(name)
    dev = resolve_device(device)
    frozen = resolve_frozen_dtype(dtype, dev)
    source = weights if weights is not None else spec.weights
    if source is None:
        parts = _random_bundle(spec, dev, text_encoder)
        source_desc = f"random(seed={spec.seed})"
    else:
        if source.startswith("package:"):
            found = bundled_weights_dir(source.split(":", 1)[1])
            if found is None:
                raise CheckpointError(f"preset {name!r} weights are not bundled with this install; use --preset tiny")
            directory = found
        elif source == "":
            raise CheckpointError(f"preset {name!r} needs --weights DIR: convert the official checkpoints first with "
                                  "`editinfinity convert --transformer infinity_2b_reg.pth --vae "
                                  "infinity_vae_d32reg.pth --text-encoder google/flan-t5-xl --out DIR`")
        else:
            directory = Path(resolve_pretrained(
                source, what="--weights" if weights is not None else f"preset {name!r} weights",
                expected="a directory written by `editinfinity convert` or a Hugging Face hub id"))
        parts = _directory_bundle(directory, text_encoder)
        source_desc = str(directory)
    vae, transformer, tokenizer, text_encoder = parts
    tokenizer.model_max_length = 512
    if bias_mode is not None:
        transformer.set_bias_mode(bias_mode)
    for m in (vae, transformer, text_encoder):
        if m is not None:
            m.eval().requires_grad_(False).to(dev)
    if frozen != torch.float32:
        transformer.cast_frozen(frozen)
        if text_encoder is not None:
            text_encoder.to(frozen)
    log.info("loaded preset %s from %s on %s (frozen weights %s%s)", name, source_desc, dev, frozen,
             "" if text_encoder is not None else ", no text encoder")
    return ModelBundle(vae=vae, transformer=transformer, tokenizer=tokenizer, text_encoder=text_encoder, device=dev,
                       preset=name, source=source_desc, frozen_dtype=frozen)
