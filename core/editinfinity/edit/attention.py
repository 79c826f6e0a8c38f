"""Stage D, attention (mode "auto"): the target word's cross-attention map on the last scale's grid.

The vanilla model (no LoRA, plain source prompt, no learned rows) reads the source image teacher-forced on its
exact codes — what the reference obtains by generating with every scale replaced by the source codes — and the
conditional branch's cross-attention to the target's tokens is averaged over heads, layers and scales.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import StageError
from ..models.bundle import ModelBundle
from ..models.infinity import AttentionMapCollector
from ..models.quantizer import inputs_from_bits
from ..report import attention_overlay
from .artifacts import read_stage, read_tensors, stage_output
from .prepare import CaseData, load_case, require_mode, require_models

ATTENTION_FILE = "attention.safetensors"


@torch.no_grad()
def attention_map(models: ModelBundle, case: CaseData) -> torch.Tensor:
    """(hK, wK) float32 mean cross-attention of the target word's tokens."""
    require_mode(case, "auto", stage="attention")
    collector = AttentionMapCollector(case.target_range, case.schedule)
    x_in = inputs_from_bits([b.to(models.device) for b in case.bits], case.schedule)
    text = case.text["source_plain"].to(models.device)
    with models.autocast():
        models.transformer(text, x_in, case.schedule, attention_probe=collector)
    return collector.result().float().cpu()


def load_attention(attention_dir, run_id: str | None = None) -> torch.Tensor:
    read_stage(attention_dir, "attention", run_id=run_id, needed_by="the mask stage")
    path = Path(attention_dir) / ATTENTION_FILE
    if not path.is_file():
        raise StageError(f"{path} is missing; re-run the attention stage")
    return read_tensors(path, "attention")["attention"]


def attention(case_dir, out_dir, *, models: ModelBundle | None = None, overwrite: bool = False) -> Path:
    """Stage D over files: writes ``attention.safetensors`` and ``attention.png`` (overlay on the image)."""
    from ..models.bundle import load_models

    case = load_case(case_dir)
    models = models or load_models(case.preset)
    identity = require_models(case, models, stage="attention")
    started = time.perf_counter()  # after loading: the stage's own work
    amap = attention_map(models, case)
    with stage_output(out_dir, "attention", run_id=case.run_id, overwrite=overwrite, started=started,
                      settings={"target_word": case.spec.target_word, "token_range": list(case.target_range)}
                      ) as (tmp, record):
        save_file({"attention": amap.contiguous()}, str(tmp / ATTENTION_FILE))
        record["models"] = identity
        attention_overlay(case.image, amap).save(tmp / "attention.png")
        record["min"], record["max"] = float(amap.min()), float(amap.max())
    return Path(out_dir)
