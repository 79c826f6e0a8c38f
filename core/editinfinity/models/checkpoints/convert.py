"""Official checkpoints: safe reading, strict key mapping, and conversion to the save_pretrained layout.

The official files are pickles of plain tensor dicts (``infinity_2b_reg.pth`` is a flat ``{name: tensor}``,
``infinity_vae_d32reg.pth`` holds its state dict under ``'vae'``). They are read with
``torch.load(weights_only=True)`` — never plain pickle — and mapped onto our modules strictly: any missing,
unexpected or wrongly shaped key is a :class:`CheckpointError`. ``convert_official`` writes the diffusers-style
directory (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``model_index.json``) whose later loads are
memory-mapped safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import CheckpointError
from ...outputs import claim_output
from ...storage.uri import file_uri_path

log = logging.getLogger(__name__)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_checkpoint(path: str | os.PathLike, *, unwrap: tuple[str, ...] = ("vae", "state_dict", "model")) -> dict:
    """Read a tensor dict from a safetensors or ``.pth`` file (``weights_only=True``), unwrapping a single
    top-level container key such as ``'vae'``. ``path`` may be a ``file://`` URI."""
    path = Path(file_uri_path(os.fspath(path)))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (download the official weights "
                              "first, see README 'Official weights')")
    if path.suffix in SAFE_SUFFIXES:
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({exc}); re-download it") from exc
    else:
        try:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} cannot be read as a plain tensor checkpoint with weights_only=True ({exc}). "
                "Untrusted pickles are never executed; convert it to safetensors where it was made, or re-download "
                "the official file") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict of tensors")
    for key in unwrap:
        if key in state and isinstance(state[key], dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[key]
            break
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-tensor entries {bad[:5]}; expected a flat tensor dict")
    return state


def convert_official(out_dir: str | os.PathLike, *, preset: str = "2b", transformer: str | None = None,
                     vae: str | None = None, text_encoder: str | None = None, overwrite: bool = False) -> Path:
    """Write official ``.pth`` weights (and a T5 directory or hub id) into the save_pretrained layout.

    The result loads with ``load_models(weights=out_dir)`` and ``EditInfinityPipeline.from_pretrained(out_dir)``.
    The output directory appears only when every component was written.
    """
    from transformers import AutoTokenizer, T5EncoderModel

    from ..bsq_vae import BSQVAE
    from ..infinity import Infinity
    from ..presets import get_preset
    from .infinity import load_infinity_state_dict
    from .vae import load_vae_state_dict

    spec = get_preset(preset)
    with claim_output(out_dir, overwrite=overwrite, inputs=(transformer, vae, text_encoder), what="convert") as tmp:
        if transformer:
            model = Infinity(**spec.transformer)
            load_infinity_state_dict(model, read_checkpoint(transformer))
            model.save_pretrained(tmp / "transformer")
            del model
        if vae:
            model = BSQVAE(**spec.vae)
            load_vae_state_dict(model, read_checkpoint(vae))
            model.save_pretrained(tmp / "vae")
            del model
        if text_encoder:
            from ..text import resolve_pretrained

            t5_dir = resolve_pretrained(text_encoder)
            T5EncoderModel.from_pretrained(t5_dir).save_pretrained(tmp / "text_encoder")
            AutoTokenizer.from_pretrained(t5_dir, legacy=True).save_pretrained(tmp / "tokenizer")
        write_model_index(tmp, preset=preset)
    log.info("wrote converted weights to %s", out_dir)
    return Path(out_dir)


def write_model_index(directory: Path, *, preset: str) -> None:
    """model_index.json in diffusers' format so ``DiffusionPipeline.from_pretrained`` finds the components."""
    index = {
        "_class_name": "EditInfinityPipeline",
        "_diffusers_version": _diffusers_version(),
        "editinfinity_preset": preset,
        "transformer": ["editinfinity.models.infinity", "Infinity"],
        "vae": ["editinfinity.models.bsq_vae", "BSQVAE"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
