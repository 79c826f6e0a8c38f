"""GPU checks (skipped without CUDA): the whole edit under bf16 autocast, and bf16 vs float32 agreement."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from editinfinity.demo import example_dir
from editinfinity.edit.case import CaseSpec
from editinfinity.edit.prepare import prepare_case
from editinfinity.edit.prompt_tuning import prompt_tuning_loss
from editinfinity.edit.run import run_edit
from editinfinity.edit.settings import EditSettings
from editinfinity.edit.training import make_generator
from editinfinity.models.bundle import load_models

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def case_kwargs():
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    return {"image": str(ex / case["image"]), "prompt": case["prompt"], "edit_prompt": case["edit_prompt"],
            "target_word": case["target_word"]}


@pytest.mark.parametrize("mode", ["auto", "whole"])
def test_edit_on_gpu(tmp_path, case_kwargs, mode):
    kw = dict(case_kwargs)
    if mode != "auto":
        kw.pop("target_word")
    out = run_edit(tmp_path / "out", mode=mode, preset="tiny", device="cuda",
                   settings=EditSettings(prompt_iters=3, lora_iters=3), progress=False, **kw)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds"]["peak_gpu_memory_gb"] > 0
    assert (out / "edited.png").is_file()


def test_bf16_loss_agrees_with_float32(case_kwargs):
    """The teacher-forced training loss under bf16 autocast stays within 2 % of float32 (tolerance of this test)."""
    models = load_models("tiny", device="cuda")
    models.transformer.init_weights(1.0, 1.0, 1.0)  # make every block matter (random tiny init is near-identity)
    spec = CaseSpec(mode="auto", resolution="0.06M", **case_kwargs)
    case = prepare_case(models, spec)
    settings = EditSettings(noise_strength=0.0, cond_drop_rate=0.0, drop_path_rate=0.0)
    rows = torch.zeros(settings.style_rows, case.text["source_styled"].features.shape[-1], device="cuda")
    with torch.no_grad():
        bf16 = prompt_tuning_loss(models, case, rows, settings, make_generator(models.device, 0)).item()
        fp32_models = dataclasses.replace(models, precision="float32")
        fp32 = prompt_tuning_loss(fp32_models, case, rows, settings, make_generator(models.device, 0)).item()
    assert abs(bf16 - fp32) / fp32 < 0.02, (bf16, fp32)
