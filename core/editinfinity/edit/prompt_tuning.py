"""Stage B, prompt tuning: learn the "language style" rows appended to the styled source prompt.

The rows live in raw T5 space (before the transformer's ``text_norm``) and start at zero, exactly as the reference
parameterises them (docs/method.md, section 2); everything else is frozen and only the rows are clipped and optimised.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import StageError
from ..models.bundle import ModelBundle
from .artifacts import read_stage, read_tensors, stage_output
from .prepare import CaseData, load_case, require_models
from .settings import EditSettings
from .training import (
    learning_rate,
    make_generator,
    on_device,
    optimize,
    stage_checkpoint_blocks,
    styled_text,
    teacher_forcing_inputs,
    training_mode,
)

EMBEDDING_FILE = "prompt_embedding.safetensors"


def prompt_tuning_loss(models: ModelBundle, case: CaseData, rows: torch.Tensor, settings: EditSettings,
                       generator: torch.Generator) -> torch.Tensor:
    """One sample of the stage-B objective: the scale-reweighted bitwise CE with the rows appended."""
    gt_bits, x_in = teacher_forcing_inputs(models, case, settings, generator)
    text = styled_text(case, "source_styled", rows, models.device)
    with models.autocast():
        logits = models.transformer(text, x_in, case.schedule, generator=generator)
    return models.transformer.bit_loss(logits.float(), gt_bits, case.schedule)


def tune_prompt_embedding(models: ModelBundle, case: CaseData, settings: EditSettings | None = None,
                          progress: bool = True, info: dict | None = None) -> tuple[torch.Tensor, list[float]]:
    """Learn ``settings.style_rows`` rows for ``settings.prompt_iters`` optimizer updates; returns (rows, losses).

    ``info``, when given, receives ``checkpoint_blocks`` (blocks recomputed in the backward pass).
    """
    settings = settings or EditSettings()
    channels = case.text["source_styled"].features.shape[-1]
    rows = torch.zeros(settings.style_rows, channels, device=models.device, requires_grad=True)
    gen = make_generator(models.device, settings.seed)
    case = on_device(case, models.device, ["source_styled"])
    n_ckpt = stage_checkpoint_blocks(models, case, settings)
    if info is not None:
        info["checkpoint_blocks"] = n_ckpt
    with training_mode(models.transformer, settings, checkpoint_blocks=n_ckpt):
        losses = optimize([rows], lambda _: prompt_tuning_loss(models, case, rows, settings, gen),
                          settings.prompt_iters, settings, "prompt tuning", progress,
                          lr=learning_rate(settings, models))
    return rows.detach().cpu(), losses


def save_embedding(rows: torch.Tensor, path: Path, settings: EditSettings, lr: float | None = None) -> None:
    save_file({"rows": rows.float().contiguous()}, str(path),
              metadata={"style_rows": str(rows.shape[0]), "prompt_iters": str(settings.prompt_iters),
                        "seed": str(settings.seed), "lr": str(lr if lr is not None else settings.lr)})


def load_embedding(prompt_dir: str | Path, run_id: str | None = None) -> torch.Tensor:
    read_stage(prompt_dir, "tune_prompt", run_id=run_id, needed_by="this stage")
    path = Path(prompt_dir) / EMBEDDING_FILE
    if not path.is_file():
        raise StageError(f"{path} is missing; re-run tune-prompt")
    return read_tensors(path, "tune-prompt")["rows"]


def tune_prompt(case_dir, out_dir, *, iters: int = 10, seed: int = 0, models: ModelBundle | None = None,
                settings: EditSettings | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Stage B over files: reads the case directory, writes ``prompt_embedding.safetensors``."""
    from ..models.bundle import load_models

    case = load_case(case_dir)
    models = models or load_models(case.preset)
    identity = require_models(case, models, stage="tune-prompt")
    started = time.perf_counter()  # after loading: the stage's own work
    settings = dataclasses.replace(settings or EditSettings(), prompt_iters=iters, seed=seed)  # caller's untouched
    info: dict = {}
    rows, losses = tune_prompt_embedding(models, case, settings, progress, info=info)
    with stage_output(out_dir, "tune_prompt", run_id=case.run_id, overwrite=overwrite, started=started,
                      settings=settings.stage_dict()) as (tmp, record):
        lr = learning_rate(settings, models)
        save_embedding(rows, tmp / EMBEDDING_FILE, settings, lr)
        record["losses"] = losses
        record["lr"] = lr
        record["models"] = identity
        record.update(info)
    return Path(out_dir)
